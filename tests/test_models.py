"""The model registry: every architecture builds with an N-class head and carries its spec."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from service.preprocessing import image_to_tensor
from training.config import ModelConfig
from training.models import WeightsUnavailableError, create_model, list_models

TORCHVISION = ["resnet18", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny"]


def test_registry_lists_the_ladder() -> None:
    assert {"lenet5", "simple_cnn", "efficientnet_lite0", *TORCHVISION} <= set(list_models())


def test_unknown_arch_lists_the_available_ones() -> None:
    with pytest.raises(ValueError, match="available: .*lenet5"):
        create_model(ModelConfig(arch="vgg99"), 3)


def test_lenet5_is_the_lecture_model() -> None:
    bundle = create_model(ModelConfig(arch="lenet5"), 10)
    kinds = {type(m).__name__ for m in bundle.model.modules()}
    assert {"Tanh", "AvgPool2d"} <= kinds and not {"ReLU", "MaxPool2d"} & kinds
    assert bundle.spec.input_size == (32, 32) and bundle.spec.color_mode == "L"
    assert bundle.model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    "knobs",
    [
        {"kernel_size": 5, "padding": 2, "stride": 1, "dilation": 1, "activation": "relu", "pooling": "max"},
        {"kernel_size": 3, "padding": 0, "stride": 2, "dilation": 2, "activation": "tanh", "pooling": "avg"},
        {"kernel_size": 3, "padding": "same", "stride": 2, "activation": "gelu", "pooling": "none", "batch_norm": False},
        {"kernel_size": 3, "activation": "sigmoid", "color_mode": "L", "dropout": 0.5, "channels": [4, 8, 16]},
    ],
)
def test_simple_cnn_from_config(knobs: dict) -> None:
    cfg = ModelConfig(arch="simple_cnn", image_size=40, **knobs)
    bundle = create_model(cfg, 4)
    convs = [m for m in bundle.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == len(cfg.channels)
    assert convs[0].kernel_size == (cfg.kernel_size,) * 2 and convs[0].dilation == (cfg.dilation,) * 2
    assert convs[0].stride == (cfg.stride,) * 2
    has_bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in bundle.model.modules())
    assert has_bn == cfg.batch_norm
    x = torch.zeros(2, bundle.spec.channels, *bundle.spec.input_size)
    assert bundle.model(x).shape == (2, 4)


@pytest.mark.parametrize("arch", TORCHVISION)
def test_torchvision_models_take_a_new_head_and_their_weights_spec(arch: str) -> None:
    import torchvision

    bundle = create_model(ModelConfig(arch=arch, image_size=64), 3)
    bundle.model.eval()
    assert bundle.model(torch.zeros(1, 3, 64, 64)).shape == (1, 3)
    transforms = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
    assert bundle.spec.mean == tuple(transforms.mean) and bundle.spec.std == tuple(transforms.std)
    assert bundle.spec.interpolation == transforms.interpolation.value
    assert bundle.head and all(bundle.model.get_submodule(h) is not None for h in bundle.head)


def test_pretrained_torchvision_offline_says_how_to_supply_weights() -> None:
    with pytest.raises(WeightsUnavailableError, match="--weights FILE") as err:
        create_model(ModelConfig(arch="resnet18", pretrained=True), 3)
    assert "resnet18-" in str(err.value)  # names the file to fetch


def test_weights_file_is_loaded(tmp_path: Path) -> None:
    import torchvision

    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    bundle = create_model(ModelConfig(arch="resnet18", pretrained=True, weights=tmp_path / "resnet18.pth"), 5)
    assert torch.equal(bundle.model.conv1.weight, reference.conv1.weight)
    assert bundle.model.fc.out_features == 5


def test_weights_file_for_another_architecture_is_refused(tmp_path: Path) -> None:
    import torchvision

    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), tmp_path / "other.pth")
    with pytest.raises(WeightsUnavailableError, match="does not fit"):
        create_model(ModelConfig(arch="resnet18", pretrained=True, weights=tmp_path / "other.pth"), 5)


def test_efficientnet_lite0_offline_weights_recognise_a_real_cat() -> None:
    """The position mapping is right: ImageNet predictions on a real photo make sense."""
    import io

    import timm
    from PIL import Image
    from skimage import data

    from training.models import lite0_imagenet_state_dict

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    model.load_state_dict(lite0_imagenet_state_dict(model), strict=True)
    spec = create_model(ModelConfig(arch="efficientnet_lite0", pretrained=True), 2).spec
    assert (spec.input_size, spec.resize_size, spec.mean) == ((224, 224), 256, (0.5, 0.5, 0.5))
    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buf, format="JPEG", quality=95)
    with torch.no_grad():
        logits = model(torch.from_numpy(image_to_tensor(buf.getvalue(), spec))[None])
    assert int(logits.argmax()) in {281, 282, 285}  # tabby, tiger cat, Egyptian cat


def test_image_size_and_crop_override_the_spec() -> None:
    spec = create_model(ModelConfig(arch="efficientnet_lite0", image_size=64, crop_pct=1.0), 2).spec
    assert spec.input_size == (64, 64) and spec.resize_size == 64
    spec = create_model(ModelConfig(arch="efficientnet_lite0", image_size=64), 2).spec
    assert spec.resize_size == int(np.floor(64 / 0.875))


def test_stochastic_depth_and_dropout_reach_the_model() -> None:
    bundle = create_model(ModelConfig(arch="efficientnet_lite0", dropout=0.0, drop_path=0.5, image_size=32), 2)
    bundle.model.train()
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(0)
    a = bundle.model(x)
    torch.manual_seed(1)
    b = bundle.model(x)
    assert not torch.allclose(a, b)  # blocks dropped at random
    plain = create_model(ModelConfig(arch="efficientnet_lite0", dropout=0.0, drop_path=0.0, image_size=32), 2)
    plain.model.train()
    torch.manual_seed(0)
    c = plain.model(x)
    torch.manual_seed(1)
    assert torch.allclose(c, plain.model(x))
