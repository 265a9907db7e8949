"""The training config: validated once, errors that name the key, layers that override in order."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from training.config import ConfigError, TrainConfig, resolve_config


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("regularization:\n  weight_decai: 0.1\n")
    with pytest.raises(ConfigError, match=r"regularization\.weight_decai: unknown key"):
        resolve_config(path)


def test_bad_choice_lists_allowed_values() -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config(None, {"optim": {"optimizer": "adam"}})
    assert "optim.optimizer" in str(err.value)
    assert "'sgd'" in str(err.value) and "'adamw'" in str(err.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"epochs": 0}, "epochs"),
        ({"regularization": {"label_smoothing": 1.5}}, "regularization.label_smoothing"),
        ({"data": {"val_fraction": 1.0}}, "data.val_fraction"),
        ({"model": {"activation": "swish"}}, "model.activation"),
        ({"batch_size": "many"}, "batch_size"),
        ({"optim": {"optimizer": "adamw", "nesterov": True}}, "optim"),
    ],
)
def test_bad_values_name_their_key(override: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve_config(None, override)


def test_weights_without_pretrained_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pretrained"):
        resolve_config(None, {"model": {"arch": "resnet18", "weights": str(tmp_path / "w.pth")}})


def test_layers_override_in_order(tmp_path: Path) -> None:
    """defaults < recipe < file < flags."""
    default = TrainConfig()
    recipe = resolve_config(None, {"model": {"arch": "lenet5"}})
    assert recipe.optim.optimizer == "sgd" and recipe.optim.lr == 0.05  # from recipes/lenet5.yaml
    assert default.optim.optimizer == "adamw"
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"model": {"arch": "lenet5"}, "optim": {"lr": 0.01}, "epochs": 3}))
    from_file = resolve_config(path)
    assert (from_file.optim.optimizer, from_file.optim.lr, from_file.epochs) == ("sgd", 0.01, 3)
    flagged = resolve_config(path, {"optim": {"lr": 0.2}})
    assert (flagged.optim.lr, flagged.epochs) == (0.2, 3)


def test_pretrained_and_scratch_recipes_differ() -> None:
    pretrained = resolve_config(None, {"model": {"arch": "efficientnet_lite0", "pretrained": True}})
    scratch = resolve_config(None, {"model": {"arch": "efficientnet_lite0", "pretrained": False}})
    assert pretrained.optim.lr < scratch.optim.lr  # pretrained weights need a gentler rate
    assert pretrained.epochs == scratch.epochs  # same budget, so the comparison is fair


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    from training.config import save_config

    cfg = resolve_config(None, {"model": {"arch": "simple_cnn", "channels": [8, 16]}, "seed": 7})
    save_config(cfg, tmp_path / "config.yaml")
    assert resolve_config(tmp_path / "config.yaml") == cfg
