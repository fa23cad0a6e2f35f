# deqguard inference service (+ admin API) on NVIDIA GPUs; runs on CPU too (see docs/DEPLOYMENT.md).
#
# BASE_IMAGE is any Debian/Ubuntu image; the default is CUDA 13.0's runtime, since torch==2.14.1
# comes from the PyTorch cu130 wheel index. A base without python3 gets it (and python3-venv) with
# apt; one that has them (the Debian base scripts/make_local_images.sh makes) needs no apt at all.
#
# Offline install: `make image` fills wheelhouse/ with wheels of deqguard and every pinned
# dependency (`pip wheel`, on the host). When wheelhouse/ holds wheels, the build installs only
# from them (`pip install --no-index`), so it needs no package index; the wheels must be built by
# the same Python minor version as the base image's python3. With an empty wheelhouse/ (a fresh
# clone) the build installs from PyPI and the PyTorch index, as before.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04
ARG BASE_IMAGE=${CUDA_IMAGE}

# ---------------------------------------------------------------- build: a venv with deqguard
FROM ${BASE_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY wheelhouse/ /wheels/
# Ubuntu's or Debian's python3 of the base release; versions follow the pinned base image.
# The compiler is there only for the online path, should a dependency come as an sdist.
# hadolint ignore=DL3008,SC2086
RUN if [ -n "$(find /wheels -name '*.whl' -print -quit)" ]; then extra=""; else extra="python3-dev build-essential"; fi \
    && if ! python3 -c 'import ensurepip, venv' 2>/dev/null || [ -n "$extra" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv $extra \
        && rm -rf /var/lib/apt/lists/*; \
    fi
# 1. the dependencies (the big layer: torch and CUDA libraries), cached until pyproject.toml or
#    the wheelhouse changes
COPY pyproject.toml ./
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" >requirements.txt \
    && python3 -m venv /opt/venv \
    && if [ -n "$(find /wheels -name '*.whl' -print -quit)" ]; then \
        echo "installing from the wheelhouse ($(find /wheels -name '*.whl' | wc -l) wheels), no index"; \
        /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /wheels -r requirements.txt \
        || { echo "wheelhouse/ does not fit $(python3 -V) of this base: build it with that Python (make image WHEEL_PYTHON=...)" >&2; exit 1; }; \
    else \
        /opt/venv/bin/pip install --no-cache-dir \
            --extra-index-url https://download.pytorch.org/whl/cu130 -r requirements.txt; \
    fi
# 2. deqguard itself, as a wheel that the runtime stage installs into the venv (a small layer)
COPY README.md ./
COPY deqguard ./deqguard
COPY service ./service
COPY training ./training
# hadolint ignore=SC2086
RUN if [ -n "$(find /wheels -name '*.whl' -print -quit)" ]; then offline="--no-index --find-links /wheels"; else offline=""; fi \
    && /opt/venv/bin/pip wheel --no-cache-dir --no-deps $offline --wheel-dir /dist .

# ---------------------------------------------------------------- runtime
FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --system --gid 10001 deqguard \
    && useradd --system --uid 10001 --gid deqguard --home-dir /app --shell /usr/sbin/nologin deqguard \
    && mkdir -p /var/lib/deqguard /data \
    && chown deqguard:deqguard /var/lib/deqguard
COPY --from=build /opt/venv /opt/venv
COPY --from=build /dist /tmp/dist
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --no-index /tmp/dist/*.whl \
    && rm -rf /tmp/dist \
    && /opt/venv/bin/python -c "import deqguard, service, training, torch; print('torch', torch.__version__)"
WORKDIR /app
COPY --chown=root:root model_store ./model_store
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DEQGUARD_HOST=0.0.0.0 \
    DEQGUARD_PORT=8000 \
    DEQGUARD_GRPC_PORT=8001 \
    DEQGUARD_MODEL_STORE=/app/model_store \
    DEQGUARD_STATE_DIR=/var/lib/deqguard \
    DEQGUARD_DATA_DIR=/data \
    MPLCONFIGDIR=/tmp/matplotlib
USER 10001:10001
EXPOSE 8000 8001
VOLUME ["/var/lib/deqguard"]
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os,sys,urllib.request as u; sys.exit(0 if u.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('DEQGUARD_PORT', '8000'), timeout=4).status == 200 else 1)"]
STOPSIGNAL SIGTERM
CMD ["deqguard", "serve"]
