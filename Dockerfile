# tribunal: one image for every role (worker, aggregator, judge, exporter, producer);
# the compose service's command picks the role. Slim, pinned base, runs as a non-root user.
#   docker build -t tribunal .
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --system --uid 10001 --create-home --home-dir /home/tribunal tribunal

WORKDIR /app
# Dependencies first, pinned by the lock file, so code edits do not reinstall them.
COPY pyproject.toml requirements.lock README.md ./
COPY common ./common
COPY consumers ./consumers
COPY producers ./producers
COPY tribunal ./tribunal
RUN pip install -c requirements.lock . \
    && tribunal --help > /dev/null
COPY examples ./examples

USER tribunal
ENTRYPOINT ["tribunal"]
CMD ["--help"]
