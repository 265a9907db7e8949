"""``imgclf explain``, ``imgclf featuremaps`` and ``imgclf summary``: what the network sees, and its arithmetic.

``explain`` takes a training run (torch Grad-CAM with autograd, the reference) or a registered
version ``NAME[:VERSION]`` (ONNX Runtime and numpy, exactly what ``POST /explain`` computes; no torch
needed). ``featuremaps`` and ``summary`` need the train extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from imgclf.cli.common import (
    RepoOpt,
    SizeOpt,
    fail,
    model_ref,
    repository,
    require_training,
    user_errors,
)

app = typer.Typer()

SourceArg = Annotated[str, typer.Argument(help="a training run directory, or a registered model NAME[:VERSION]")]
ImageArg = Annotated[Path, typer.Argument(help="the image file (any format /classify takes)")]


def _image(path: Path) -> bytes:
    if not path.is_file():
        fail(f"no image file {path}")
    return path.read_bytes()


def _is_run(source: str) -> bool:
    return Path(source).is_dir()


@app.command()
def explain(
    source: SourceArg,
    image: ImageArg,
    out: Annotated[Path, typer.Option("--out", help="where to write the PNG: the heatmap over the model's crop")],
    target: Annotated[str | None, typer.Option("--target", help="a label or a class index (default: top-1)")] = None,
    repo: RepoOpt = None,
) -> None:
    """Where the model saw a class: a colour-mapped heatmap over the model's input crop, as PNG."""
    from service.cam import ExplainError

    data = _image(image)
    if out.suffix.lower() != ".png":
        fail(f"--out must name a .png file, got {out}")
    with user_errors(ExplainError):
        if _is_run(source):
            require_training()
            from training.explain.gradcam import explain_image
            from training.explain.heads import feature_layer
            from training.explain.runs import RunError, load_run

            with user_errors(RunError):
                run = load_run(Path(source))
            layer = feature_layer(run.arch)
            if layer is None:
                fail(f"no feature layer is known for {run.arch}; export the run and explain the version instead")
            result = explain_image(run.model, layer, data, run.spec, run.labels, target, run.temperature)
            png, what, method = result.png(), f"run {source} ({run.arch})", "torch Grad-CAM"
        else:
            from service.explainer import Explainer
            from service.runtime import OnnxModel

            ref = model_ref(source)
            version = repository(repo).get(ref.name, ref.version)
            explainer = Explainer(OnnxModel.load(version.model_path, version.manifest))
            result = explainer.explain(data, target)  # type: ignore[assignment] # same fields as a run's
            png, what, method = result.png(), f"{version.manifest.name}:{version.manifest.version}", explainer.method
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png)
    t = result.target
    box = ", ".join(f"{v:.0f}" for v in result.crop_box)
    typer.echo(f"{t.label!r} (index {t.index}, score {t.score:.3f}) from {what} by {method}; "
               f"crop box [{box}] -> {out}")


@app.command()
def featuremaps(
    source: Annotated[str, typer.Argument(help="a training run directory, or an architecture (see `imgclf archs`)")],
    image: ImageArg,
    out: Annotated[Path, typer.Option("--out", help="directory for one grid PNG per convolutional stage")],
    image_size: SizeOpt = None,
    pretrained: Annotated[bool, typer.Option("--pretrained/--no-pretrained",
                                             help="an architecture with ImageNet weights (offline for "
                                                  "efficientnet_lite0); default random weights")] = False,
) -> None:
    """The feature maps of each convolutional stage on your image ("a filter makes a feature map")."""
    require_training()
    from training.explain.featuremaps import write_featuremaps
    from training.explain.runs import RunError, arch_model, load_run
    from training.models import list_models

    data = _image(image)
    if _is_run(source):
        if image_size is not None or pretrained:
            fail("--image-size and --pretrained are for an architecture; a run has its own")
        with user_errors(RunError):
            model = load_run(Path(source))
    elif source in list_models():
        with user_errors(ValueError):  # e.g. "lenet5 has no pretrained weights"
            model = arch_model(source, image_size, pretrained)
    else:
        fail(f"{source!r} is neither a run directory nor an architecture; architectures: {', '.join(list_models())}")
    with user_errors(TypeError):  # an architecture with no stage list
        paths = write_featuremaps(model.arch, model.model, data, model.spec, out)
    for path in paths:
        typer.echo(str(path))


@app.command()
def summary(
    arch: Annotated[str, typer.Option("--arch", help="architecture name (see `imgclf archs`)")],
    image_size: SizeOpt = None,
    num_classes: Annotated[int, typer.Option("--num-classes", min=2, help="classes of the head")] = 1000,
) -> None:
    """Per layer: kernel, stride, padding, dilation, output shape, receptive field, parameters, multiply-adds."""
    require_training()
    from training.explain.summary import format_table, summarize_arch
    from training.models import list_models

    if arch not in list_models():
        fail(f"unknown --arch {arch!r}; available: {', '.join(list_models())}")
    with user_errors(ValueError):
        rows = summarize_arch(arch, image_size=image_size, num_classes=num_classes)
    typer.echo(format_table(rows))
