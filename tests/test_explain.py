"""Explanations: the numpy serving path (service/cam.py) against torch autograd, on every architecture.

Measured agreement of numpy Grad-CAM (torch features + exported head arrays) with torch autograd
Grad-CAM (Pearson of the signed maps at feature resolution, minimum over the top-1 and the last class, random
weights, chelsea photo; 2026-12, torch 2.14.1), recorded in AGREEMENT and asserted to 0.99:
exact CAM heads: resnet18, resnet50, efficientnet_b0, efficientnet_lite0, simple_cnn: 1.0000;
Grad-CAM through a non-linear head: mobilenet_v3_small/large, convnext_tiny, lenet5: 1.0000.
The gradient is exact for all of them (the head is backpropagated op by op), so "approximate"
refers to what Grad-CAM means for a non-linear head, not to a numerical gap.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from service.cam import (
    ExplainError,
    ExplainSpec,
    Head,
    HeadOp,
    Heatmap,
    gradcam,
    heatmaps,
    occlusion,
    resolve_target,
    upsample,
)
from service.overlay import JET, crop_box, overlay_png
from service.preprocessing import PreprocessSpec, decode_for_spec, image_to_tensor, resize_and_crop
from tests.support.heatmaps import assert_peak_in_cell
from training.config import ModelConfig
from training.explain.featuremaps import feature_maps, write_featuremaps
from training.explain.gradcam import explain_image, pearson, torch_gradcam
from training.explain.heads import explain_head
from training.models import create_model, list_models

# arch -> (image size for the test, exact CAM?, measured Pearson (min over classes))
AGREEMENT: dict[str, tuple[int | None, bool, float]] = {
    "lenet5": (None, False, 1.0000),
    "simple_cnn": (32, True, 1.0000),
    "resnet18": (128, True, 1.0000),
    "resnet50": (128, True, 1.0000),
    "mobilenet_v3_small": (128, False, 1.0000),
    "mobilenet_v3_large": (128, False, 1.0000),
    "efficientnet_b0": (128, True, 1.0000),
    "convnext_tiny": (128, False, 1.0000),
    "efficientnet_lite0": (128, True, 1.0000),
}
NUM_CLASSES = 5


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="module")
def chelsea() -> bytes:
    from skimage import data

    return _jpeg(Image.fromarray(data.chelsea()))


def test_every_registered_architecture_has_a_method() -> None:
    assert set(AGREEMENT) == set(list_models())


@pytest.mark.parametrize("arch", sorted(AGREEMENT))
def test_numpy_gradcam_agrees_with_torch_autograd(arch: str, chelsea: bytes, tmp_path) -> None:
    size, exact, _figure = AGREEMENT[arch]
    torch.manual_seed(0)
    bundle = create_model(ModelConfig(arch=arch, image_size=size), NUM_CLASSES)
    model = bundle.model.eval()
    eh = explain_head(arch, model, bundle.spec)
    assert eh.module is not None and eh.spec.exact is exact
    assert eh.spec.method == ("cam" if exact else "gradcam")
    # the manifest round trip: spec as JSON, arrays through the npz side file (no pickles)
    spec = ExplainSpec.model_validate_json(eh.spec.model_dump_json())
    eh.save_arrays(tmp_path)
    head = Head.load(spec, tmp_path)

    x = torch.from_numpy(image_to_tensor(chelsea, bundle.spec))[None]
    with torch.no_grad():
        ref = model(x)
        logits, features = eh.module(x)
    assert torch.equal(logits, ref), "the (logits, features) wrapper must not change the logits"
    feats = features.numpy()
    assert feats.shape[1:] == spec.feature_shape
    np.testing.assert_allclose(head.forward(feats), ref.numpy(), rtol=1e-4, atol=1e-4)

    figures = []
    for target in (int(ref.argmax()), int(ref.argmin())):
        reference = torch_gradcam(model, spec.feature_layer, x, [target])
        np.testing.assert_allclose(reference.features, feats, rtol=0, atol=1e-6)
        raw = gradcam(head, feats, [target])
        figures.append(pearson(raw, reference.raw))
        served = heatmaps(head, feats, [target], bundle.spec.input_size)[0]
        assert served.shape == bundle.spec.input_size and 0 <= served.min() and served.max() <= 1
        if reference.maps[0].max() > 0:  # a map with nothing positive is all zero on both sides
            assert pearson(served, reference.maps[0]) >= 0.99
    assert min(figures) >= 0.99, figures
    assert min(figures) >= AGREEMENT[arch][2] - 1e-3, figures
    if exact:  # CAM: the logit is the map's spatial mean (times h*w) plus the head's bias, exactly
        h, w = feats.shape[2:]
        bias = head.forward(np.zeros_like(feats))[0]
        for target in range(NUM_CLASSES):
            cam = gradcam(head, feats, [target])[0] * h * w
            assert cam.mean() + bias[target] == pytest.approx(float(ref[0, target]), rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("arch", ["simple_cnn", "lenet5"])
def test_onnx_path_agrees_with_torch(arch: str, chelsea: bytes, tmp_path) -> None:
    """The registered-version path: ONNX Runtime returns (logits, features), numpy does the rest."""
    import onnxruntime as ort

    bundle = create_model(ModelConfig(arch=arch), NUM_CLASSES)
    model = bundle.model.eval()
    eh = explain_head(arch, model, bundle.spec)
    example = torch.randn(2, bundle.spec.channels, *bundle.spec.input_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            eh.module, (example,), dynamo=True, input_names=["input"], output_names=["logits", "features"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},), opset_version=18, verbose=False,
        )
    program.save(str(tmp_path / "model.onnx"))
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    x = image_to_tensor(chelsea, bundle.spec)[None]
    logits, features = session.run(["logits", eh.spec.feature_output], {"input": x})
    head = Head(eh.spec, eh.arrays)
    target = int(logits.argmax())
    reference = torch_gradcam(model, eh.spec.feature_layer, torch.from_numpy(x), [target])
    assert pearson(gradcam(head, features, [target]), reference.raw) >= 0.99


def _canvas(photo: np.ndarray, cell: int, size: int = 128, seed: int = 0) -> bytes:
    """A 2x2 canvas: the photo in ``cell``, noise in the next cell, flat grey elsewhere (PNG, lossless)."""
    canvas = np.full((2 * size, 2 * size, 3), 128, np.uint8)
    nr, nc = divmod((cell + 1) % 4, 2)
    canvas[nr * size : (nr + 1) * size, nc * size : (nc + 1) * size] = (
        np.random.default_rng(seed).integers(0, 256, (size, size, 3))
    )
    r, c = divmod(cell, 2)
    canvas[r * size : (r + 1) * size, c * size : (c + 1) * size] = np.asarray(
        Image.fromarray(photo).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    )
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def imagenet_lite0():
    bundle = create_model(ModelConfig(arch="efficientnet_lite0", pretrained=True), 1000)
    eh = explain_head("efficientnet_lite0", bundle.model, bundle.spec)
    return bundle, eh, Head(eh.spec, eh.arrays)


@pytest.mark.parametrize("name", ["chelsea", "coffee", "rocket", "astronaut"])
def test_localisation_on_real_photos(name: str, imagenet_lite0) -> None:
    """Measured (ImageNet Lite0, CAM): mass in the object's cell 0.55-0.91 over the 16 cases; peak always in it."""
    from skimage import data

    bundle, eh, head = imagenet_lite0
    photo = getattr(data, name)()
    with torch.no_grad():
        target = int(bundle.model(torch.from_numpy(image_to_tensor(_jpeg(Image.fromarray(photo)), bundle.spec))[None]).argmax())
    for cell in range(4):
        x = torch.from_numpy(image_to_tensor(_canvas(photo, cell), bundle.spec))[None]
        with torch.no_grad():
            _, features = eh.module(x)
        hm = heatmaps(head, features.numpy(), [target], bundle.spec.input_size)[0]
        assert_peak_in_cell(hm, cell, name)


def test_occlusion_is_batched_and_finds_the_evidence() -> None:
    """A toy model whose class-0 probability is the brightness of the top-left quarter."""
    calls: list[int] = []

    def probabilities(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        p0 = 1 / (1 + np.exp(-batch[:, :, :16, :16].mean(axis=(1, 2, 3))))
        return np.stack([p0, 1 - p0], axis=1)

    image = np.ones((3, 32, 32), np.float32)
    heat = occlusion(probabilities, image, 0, patch=8, stride=4, batch_size=16)
    positions = 7 * 7
    assert heat.shape == (32, 32) and heat.max() == 1.0
    assert len(calls) == -(-(positions + 1) // 16) and max(calls) <= 16 and sum(calls) == positions + 1
    assert heat[:16, :16].mean() > 5 * heat[16:, 16:].mean()


def _spec(**kw) -> ExplainSpec:
    base = {"method": "cam", "exact": True, "feature_output": "features", "feature_shape": (4, 2, 2),
            "head_file": "h.npz", "head": [HeadOp(op="gap"), HeadOp(op="linear", weight="w", bias="b")]}
    return ExplainSpec(**{**base, **kw})


def test_spec_and_head_file_are_validated(tmp_path) -> None:
    with pytest.raises(ValueError):
        ExplainSpec(method="occlusion", exact=False, head=[HeadOp(op="gap")])
    with pytest.raises(ValueError):
        _spec(head_file="../elsewhere.npz")
    with pytest.raises(ValueError):
        HeadOp(op="linear")
    np.savez(tmp_path / "h.npz", w=np.ones((3, 5)), b=np.zeros(3))  # takes 5 inputs, the map has 4 channels
    with pytest.raises(ExplainError):
        Head.load(_spec(), tmp_path)
    np.savez(tmp_path / "h.npz", w=np.array([object()] * 12, dtype=object).reshape(3, 4), b=np.zeros(3))
    with pytest.raises(ExplainError):  # an object array needs pickles: np.load(allow_pickle=False) refuses
        Head.load(_spec(), tmp_path)
    np.savez(tmp_path / "h.npz", w=np.ones((3, 4)), b=np.zeros(3))
    head = Head.load(_spec(), tmp_path)
    with pytest.raises(ExplainError):
        head.gradient(np.ones((1, 4, 2, 2)), [3])
    with pytest.raises(ExplainError):
        head.forward(np.ones((1, 4, 3, 3)))


def test_resolve_target() -> None:
    labels, scores = ["cat", "dog", "7"], np.array([0.1, 0.7, 0.2])
    assert resolve_target(None, labels, scores) == 1
    assert resolve_target("cat", labels, scores) == 0
    assert resolve_target("7", labels, scores) == 2  # a label wins over an index
    assert resolve_target("1", labels, scores) == 1
    assert resolve_target(2, labels, scores) == 2
    for bad in ("horse", "3", "-1", 5, True):
        with pytest.raises(ExplainError):
            resolve_target(bad, labels, scores)


@pytest.mark.parametrize("size", [(640, 427), (300, 451), (224, 224), (100, 60)])
def test_crop_box_is_where_the_crop_comes_from(size: tuple[int, int]) -> None:
    spec = PreprocessSpec(input_size=(224, 224), resize_size=256, mean=(0.5,) * 3, std=(0.5,) * 3)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    box = crop_box(*img.size, spec)
    again = img.resize((224, 224), Image.Resampling.BILINEAR, box=box, reducing_gap=None)
    assert np.array_equal(np.asarray(again), np.asarray(resize_and_crop(img, spec)))


def test_overlay_and_heatmap_payload() -> None:
    crop = Image.new("RGB", (40, 30), (128, 128, 128))
    values = upsample(np.array([[0.0, 1.0], [0.5, 0.0]], np.float32), (30, 40))
    png = overlay_png(crop, values)
    out = Image.open(io.BytesIO(png))
    assert out.format == "PNG" and out.size == (40, 30) and out.mode == "RGB"
    assert tuple(JET[0]) == (0, 0, 128) and tuple(JET[255]) == (128, 0, 0)
    payload = Heatmap.from_array(values)
    assert (payload.width, payload.height) == (40, 30) and len(payload.values) == 30


def test_explain_image_from_a_run(chelsea: bytes) -> None:
    """The `imgclf explain RUN_DIR` path: torch Grad-CAM over the crop, with the crop's place in the photo."""
    bundle = create_model(ModelConfig(arch="simple_cnn"), 3)
    result = explain_image(bundle.model, "features", chelsea, bundle.spec, ["a", "b", "c"], target="b")
    assert result.target.index == 1 and result.heatmap.shape == bundle.spec.input_size
    photo = Image.open(io.BytesIO(chelsea))  # in the photo's pixels, though the JPEG decodes at reduced scale
    assert decode_for_spec(chelsea, bundle.spec).size != photo.size
    assert result.crop_box == pytest.approx(crop_box(photo.width, photo.height, bundle.spec), abs=1.0)
    assert Image.open(io.BytesIO(result.png())).size == result.crop.size


@pytest.mark.parametrize(("arch", "size", "stages"), [("lenet5", None, 3), ("resnet18", 64, 5),
                                                      ("mobilenet_v3_small", 64, 5), ("efficientnet_lite0", 64, 5)])
def test_featuremaps_writes_one_png_per_stage(arch: str, size: int | None, stages: int, chelsea: bytes,
                                              tmp_path) -> None:
    bundle = create_model(ModelConfig(arch=arch, image_size=size), NUM_CLASSES)
    paths = write_featuremaps(arch, bundle.model, chelsea, bundle.spec, tmp_path)
    x = torch.from_numpy(image_to_tensor(chelsea, bundle.spec))[None]
    found = feature_maps(arch, bundle.model, x)
    assert len(paths) == len(found) == stages
    assert sorted(tmp_path.iterdir()) == sorted(paths)
    for path, stage in zip(paths, found, strict=True):
        img = Image.open(path)
        assert img.format == "PNG" and img.width >= 64
        assert stage.filters != "no conv" and stage.maps.ndim == 3


def test_every_op_backpropagates_like_torch() -> None:
    """Ops no registry head uses yet (sigmoid, gelu, a mid-head LayerNorm) are checked against autograd too."""
    rng = np.random.default_rng(0)
    arrays = {"w0": rng.normal(size=(12, 6)), "b0": rng.normal(size=12), "ln.w": rng.normal(size=12),
              "ln.b": rng.normal(size=12), "w1": rng.normal(size=(10, 12)), "w2": rng.normal(size=(4, 10)),
              "b2": rng.normal(size=4)}
    ops = [HeadOp(op="relu"), HeadOp(op="gap"), HeadOp(op="linear", weight="w0", bias="b0"), HeadOp(op="gelu"),
           HeadOp(op="layernorm", weight="ln.w", bias="ln.b", eps=1e-5), HeadOp(op="sigmoid"),
           HeadOp(op="linear", weight="w1"), HeadOp(op="gelu_tanh"), HeadOp(op="hardswish"), HeadOp(op="tanh"),
           HeadOp(op="dropout"), HeadOp(op="linear", weight="w2", bias="b2")]
    spec = ExplainSpec(method="gradcam", exact=False, feature_output="f", feature_shape=(6, 3, 4),
                       head_file="h.npz", head=ops)
    head = Head(spec, arrays)
    a = rng.normal(size=(2, 6, 3, 4))
    t = {k: torch.from_numpy(v) for k, v in arrays.items()}
    x = torch.from_numpy(a).requires_grad_(True)
    y = torch.relu(x).mean((2, 3)) @ t["w0"].T + t["b0"]
    y = torch.sigmoid(torch.nn.functional.layer_norm(torch.nn.functional.gelu(y), (12,), t["ln.w"], t["ln.b"]))
    y = torch.nn.functional.gelu(y @ t["w1"].T, approximate="tanh")
    y = torch.tanh(torch.nn.functional.hardswish(y)) @ t["w2"].T + t["b2"]
    np.testing.assert_allclose(head.forward(a), y.detach().numpy(), rtol=1e-5, atol=1e-5)  # float32 vs 64
    (grad,) = torch.autograd.grad(y[0, 1] + y[1, 3], x)
    np.testing.assert_allclose(head.gradient(a, [1, 3]), grad.numpy(), rtol=1e-4, atol=1e-6)


def test_heads_outside_the_op_set_fall_back_to_occlusion() -> None:
    bundle = create_model(ModelConfig(arch="simple_cnn", dropout=0.3), NUM_CLASSES)
    eh = explain_head("simple_cnn", bundle.model, bundle.spec)
    assert eh.spec.exact and [o.op for o in eh.spec.head] == ["gap", "dropout", "linear"]
    bundle.model.pool = torch.nn.AdaptiveMaxPool2d(1)  # max pooling: not an op the serving side knows
    eh = explain_head("simple_cnn", bundle.model, bundle.spec)
    assert eh.module is None and eh.spec.method == "occlusion" and not eh.spec.head
    assert explain_head("some_future_arch", bundle.model, bundle.spec).spec.method == "occlusion"
