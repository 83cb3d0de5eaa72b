# archserve: two stages.
#
#   export   python:3.11-slim + CPU torch + onnx: runs the export stage (build step only)
#            and leaves the ONNX model repository in /models.
#   runtime  python:3.11-slim + the service's runtime dependencies (onnxruntime-gpu with the
#            CUDA 13 / cuDNN 9 libraries from the package index), a non-root user, the
#            model repository copied from the export stage. No torch, no compilers.
#
#   docker build -t archserve .                                     # resnet18,resnet50
#   docker build --build-arg MODELS=resnet50,se_resnet50,inception_v3 -t archserve .
#   docker build --target export -t archserve-export .              # the exporter alone
#
# Package indexes are build arguments, so a mirror or an internal proxy can be used:
#   --build-arg PIP_INDEX_URL=https://pypi.example.internal/simple
#   --build-arg TORCH_INDEX_URL=https://pypi.example.internal/torch-cpu/simple
# (TORCH_INDEX_URL is PyTorch's CPU wheel index by default: the export stage needs no CUDA.)
#
# The same image runs with and without a GPU. With a GPU (NVIDIA driver that supports
# CUDA 13 on the host, the NVIDIA container toolkit, `--gpus all` or the compose/k8s GPU
# reservation) the CUDA provider runs the fp16 files; without one the CPU provider runs
# the fp32 files (ARCHSERVE_REQUIRE_GPU=true turns that fallback into "not ready").
# The driver itself (libcuda) is injected by the container toolkit, never baked in.
#
# Models: baked in at /models by default; a volume mounted at /models replaces them
# (publish new versions into it with the export stage and the server hot-reloads them).
#
# Image size (runtime stage), estimated from the wheels of the versions pinned below
# (onnxruntime-gpu 1.31.1, CUDA 13.0 component wheels, cuDNN 9.24: CUDA_WHEELS), download size ->
# installed size:
#   nvidia-cudnn-cu13 9.24       553 MB ->   966 MB
#   nvidia-cublas 13.1 (cuDNN)   423 MB ->   597 MB
#   onnxruntime-gpu 1.31.1       256 MB ->   350 MB
#   nvidia-cufft 12.0            214 MB ->   288 MB
#   nvidia-cuda-nvrtc 13.0        90 MB ->   228 MB
#   nvidia-curand 10.4            60 MB ->   135 MB
#   nvidia-nvjitlink 13.0 (cufft) 47 MB ->   117 MB
#   nvidia-cuda-runtime 13.0       2 MB ->     7 MB
#   numpy, Pillow, uvloop, pydantic, fastapi, uvicorn, psycopg, ... ~45 MB -> ~125 MB
#   python:3.11-slim base                     ~45 MB -> ~130 MB
#   models resnet18 + resnet50 (fp32 + fp16 each: params x 6 bytes) ~225 MB, barely
#   compressible (to gzip, weights look like noise)
# => about 3.2 GB on disk (`docker image ls`), about 1.9 GB to pull (compressed layers).
# The CUDA/cuDNN wheels are ~75% of the image and cuDNN alone ~30%:
# the price of the GPU runtime, which an nvidia/cuda *-cudnn-runtime base image would
# carry too (it is no smaller). pip's cache is off, so no wheel is stored twice.
# A CPU-only image (`onnxruntime` instead of onnxruntime-gpu, no nvidia wheels) would be
# ~0.5 GB; not built, because one image for both keeps deployments identical.

# A patch version, so a rebuild gets the same interpreter (bump it deliberately for security fixes).
ARG PYTHON_IMAGE=python:3.11.14-slim

# ---------------------------------------------------------------------------------------------- export
FROM ${PYTHON_IMAGE} AS export

ARG PIP_INDEX_URL=https://pypi.org/simple
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# torch as in the Makefile's TORCH_SPEC (the CPU build: same graphs, no CUDA download).
ARG TORCH_VERSION=2.14.1
ARG ONNXRUNTIME_VERSION=1.31.1

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
# The export extra (onnx, onnxscript, safetensors) plus what export/ and modelrepo/ import;
# the parity gate runs on onnxruntime's CPU provider, so the CPU wheel is enough here.
RUN pip install --index-url "${PIP_INDEX_URL}" \
        "onnx>=1.17" "onnxscript>=0.2" "safetensors>=0.4" \
        "onnxruntime==${ONNXRUNTIME_VERSION}" "numpy>=1.26" "Pillow>=12.2" "pydantic>=2.7"

WORKDIR /src
COPY modelrepo/ modelrepo/
COPY export/ export/

# Which models to bake into the image, and any further export options (e.g. --precision fp16).
ARG MODELS=resnet18,resnet50
ARG EXPORT_ARGS=
RUN python -m export --models "${MODELS}" --out /models ${EXPORT_ARGS}

# `docker run -v models:/models archserve-export --models se_resnet50` publishes a new
# version into a models volume (the server picks it up by hot reload).
ENTRYPOINT ["python", "-m", "export", "--out", "/models"]
CMD ["--models", "resnet18,resnet50"]

# --------------------------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

ARG PIP_INDEX_URL=https://pypi.org/simple
ARG ONNXRUNTIME_VERSION=1.31.1
# Extras of the package, comma-separated: `postgres` = the PostgreSQL experiment store's
# driver (psycopg, binary wheels), for ARCHSERVE_STORE_URL=postgresql://...; empty for none.
ARG ARCHSERVE_EXTRAS=postgres

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The CUDA 13.0 (update 2) and cuDNN 9.24 wheels, pinned: the extras alone (~=13.0, ~=9.0) resolve to
# the newest 13.x / 9.x, not the versions the README names and the GPU figures were measured with.
# nvidia-cublas and nvidia-nvjitlink come in through cuDNN and cuFFT.
ARG CUDA_WHEELS="nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 nvidia-nvjitlink==13.0.88 nvidia-cufft==12.0.0.61 nvidia-curand==10.4.0.35 nvidia-cublas==13.1.0.3 nvidia-cudnn-cu13==9.24.1.1"

# onnxruntime-gpu with its CUDA 13 / cuDNN 9 runtime wheels (nvidia-*), first and alone:
# ~2.7 GB that change only with ONNXRUNTIME_VERSION or CUDA_WHEELS, so this layer stays cached.
RUN pip install --index-url "${PIP_INDEX_URL}" "onnxruntime-gpu[cuda,cudnn]==${ONNXRUNTIME_VERSION}" ${CUDA_WHEELS}

# The service package with its runtime dependencies only (no [export], no [test]: no torch).
COPY pyproject.toml README.md /tmp/src/
COPY modelrepo/ /tmp/src/modelrepo/
COPY service/ /tmp/src/service/
RUN pip install --index-url "${PIP_INDEX_URL}" "/tmp/src${ARCHSERVE_EXTRAS:+[${ARCHSERVE_EXTRAS}]}" \
    && rm -rf /tmp/src \
    && python -c "import service.app, onnxruntime; print('onnxruntime', onnxruntime.__version__)"

RUN groupadd --system --gid 10001 archserve \
    && useradd --system --uid 10001 --gid archserve --home-dir /home/archserve --create-home \
        --shell /usr/sbin/nologin archserve \
    && mkdir -p /data /models /etc/archserve \
    && chown archserve:archserve /data

COPY --from=export --chown=archserve:archserve /models /models

# Container defaults; every other ARCHSERVE_* setting keeps the service's default.
# NVIDIA_DRIVER_CAPABILITIES asks the container toolkit for the compute libraries (and
# nvidia-smi); NVIDIA_VISIBLE_DEVICES is deliberately not set here, so that only a GPU
# request (--gpus, compose reservation, k8s nvidia.com/gpu) exposes devices.
ENV ARCHSERVE_HOST=0.0.0.0 \
    ARCHSERVE_PORT=8000 \
    ARCHSERVE_GRPC_PORT=8001 \
    ARCHSERVE_MODELS_DIR=/models \
    ARCHSERVE_STORE_PATH=/data/experiments.sqlite3 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

WORKDIR /home/archserve
USER 10001:10001
VOLUME ["/data"]
EXPOSE 8000 8001

# Ready = every model loaded, verified and warmed up (503 while loading, draining or when
# ARCHSERVE_REQUIRE_GPU is set and a model fell back to the CPU). The start period covers
# the CUDA warm-up with exhaustive cuDNN search.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('ARCHSERVE_PORT', '8000'), timeout=4)"]

STOPSIGNAL SIGTERM
CMD ["python", "-m", "service"]
