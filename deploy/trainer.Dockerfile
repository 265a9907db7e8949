# The training side of imgclf (torch, torchvision, timm, onnx): runs `imgclf pipeline` for
# docker-compose's `trainer` service. The serving image (the bento) stays without torch.
#   docker compose --profile train build trainer
# PyPI's torch wheels bring CUDA libraries (several GB); for a CPU-only image install torch and
# torchvision from PyTorch's CPU wheel index first (pip's --index-url), then the rest.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg
WORKDIR /opt/imgclf
COPY pyproject.toml README.md ./
COPY imgclf imgclf
COPY service service
COPY training training
RUN pip install '.[train]'

# Relative paths of deploy/pipeline.yaml (data/train, data/holdout) resolve here; compose mounts them.
WORKDIR /work
ENTRYPOINT ["imgclf"]
CMD ["pipeline", "--help"]
