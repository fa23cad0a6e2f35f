# deqguard inference service (+ admin API) on NVIDIA GPUs; runs on CPU too (see docs/DEPLOYMENT.md).
# torch==2.14.1 is installed from the PyTorch cu130 wheel index, so the base is CUDA 13.0's runtime.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04

# ---------------------------------------------------------------- build: a venv with deqguard
FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
# Ubuntu's python3 of this base release; versions follow the pinned base image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY deqguard ./deqguard
COPY service ./service
COPY training ./training
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir \
        --extra-index-url https://download.pytorch.org/whl/cu130 .

# ---------------------------------------------------------------- runtime
FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 deqguard \
    && useradd --system --uid 10001 --gid deqguard --home-dir /app --shell /usr/sbin/nologin deqguard \
    && mkdir -p /var/lib/deqguard /data \
    && chown deqguard:deqguard /var/lib/deqguard
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=root:root model_store ./model_store
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DEQGUARD_HOST=0.0.0.0 \
    DEQGUARD_PORT=8000 \
    DEQGUARD_MODEL_STORE=/app/model_store \
    DEQGUARD_STATE_DIR=/var/lib/deqguard \
    DEQGUARD_DATA_DIR=/data \
    MPLCONFIGDIR=/tmp/matplotlib
USER 10001:10001
EXPOSE 8000
VOLUME ["/var/lib/deqguard"]
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os,sys,urllib.request as u; sys.exit(0 if u.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('DEQGUARD_PORT', '8000'), timeout=4).status == 200 else 1)"]
STOPSIGNAL SIGTERM
CMD ["deqguard", "serve"]
