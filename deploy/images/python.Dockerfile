# A stand-in for python:3.11-slim-bookworm made without a registry: Debian's python3 (3.11)
# with venv support on a debootstrapped Debian, and OpenMP's runtime (libgomp1), which
# llama-server needs in the models image. Built by deploy/images/make-local.sh.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv libgomp1 \
    && rm -rf /var/lib/apt/lists/*
CMD ["python3"]
