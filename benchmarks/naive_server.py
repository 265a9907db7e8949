"""The naive baseline: how a first version usually looks, built only to compare against.

The same EfficientNet-Lite0 weights in PyTorch eager, torchvision transforms on a full-size Pillow
decode, one request at a time (the handler blocks the event loop), no batching.

    python -m benchmarks.naive_server --port 3100
"""

from __future__ import annotations

import argparse
import io

import torch
import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from torchvision import transforms

from training.config import ModelConfig
from training.models import create_model


def build_app() -> Starlette:
    model = create_model(ModelConfig(arch="efficientnet_lite0", pretrained=True), 1000).model.eval()
    transform = transforms.Compose([
        transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize([0.5] * 3, [0.5] * 3),
    ])

    async def classify(request: Request) -> JSONResponse:
        form = await request.form()
        data = await form["image"].read()
        image = Image.open(io.BytesIO(data)).convert("RGB")
        with torch.inference_mode():
            probs = model(transform(image)[None]).softmax(-1)[0]
        top = probs.topk(5)
        return JSONResponse({"predictions": [{"index": int(i), "score": float(s)}
                                             for s, i in zip(top.values, top.indices, strict=True)]})

    async def ready(_: Request) -> JSONResponse:
        return JSONResponse({"ready": True})

    return Starlette(routes=[Route("/classify", classify, methods=["POST"]), Route("/readyz", ready)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3100)
    args = parser.parse_args()
    uvicorn.run(build_app(), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
