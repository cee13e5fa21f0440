# A stand-in for the redis image made without a registry: Debian's redis-server (7.0), run as
# the redis user in /data like the official image (the compose command gives the flags).
# Built by deploy/images/make-local.sh.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data && chown redis:redis /data
WORKDIR /data
USER redis
EXPOSE 6379
CMD ["redis-server"]
