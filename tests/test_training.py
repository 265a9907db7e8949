"""The training loop: regularizers act, freezing holds, early stopping and exact resume work.

Runs on scikit-learn's real digits with LeNet-5 / a small CNN: seconds per run on two cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from service.preprocessing import PreprocessSpec, image_to_tensor
from training.config import TrainConfig, deep_merge, resolve_config
from training.data import load_splits
from training.regularization import no_decay_names
from training.train import build_trainer, train

pytestmark = pytest.mark.slow  # servers, training or subprocesses: not in `make test-quick`

FAST = {"model": {"arch": "lenet5"}, "epochs": 2, "batch_size": 64}


def config(**override: object) -> TrainConfig:
    return resolve_config(None, deep_merge(FAST, override))


def trained_state(cfg: TrainConfig, run_dir: Path) -> dict[str, torch.Tensor]:
    train(cfg, run_dir)
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"]


def weight_norm(state: dict[str, torch.Tensor], p: int) -> float:
    return sum(float(v.float().norm(p)) ** p for k, v in state.items() if k.endswith("weight")) ** (1 / p)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    return trained_state(config(), tmp_path_factory.mktemp("baseline"))


def test_run_directory_outputs(tmp_path: Path) -> None:
    report = train(config(epochs=3), tmp_path)
    for name in ("config.yaml", "data.json", "metrics.jsonl", "report.json", "learning_curves.png",
                 "confusion_matrix.png", "checkpoints/best.pt", "checkpoints/last.pt"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["top1"] == report["top1"] and 0.5 < saved["top1"] <= saved["top5"] <= 1
    assert set(saved["per_class"]) == {str(i) for i in range(10)}
    assert len(saved["confusion_matrix"]) == 10 and sum(map(sum, saved["confusion_matrix"])) == 360
    assert saved["temperature"] > 0 and 0 <= saved["ece_after_temperature"] <= 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    assert (tmp_path / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_uses_the_serving_preprocessing(tmp_path: Path) -> None:
    """report.json's top-1 equals the model fed by image_to_tensor one image at a time."""
    cfg = config()
    report = train(cfg, tmp_path)
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=False)
    trainer = build_trainer(cfg, tmp_path / "x", load_splits(cfg.data, cfg.seed))
    trainer.model.load_state_dict(best["model"])
    trainer.model.eval()
    spec = PreprocessSpec.model_validate(best["spec"])
    splits = load_splits(cfg.data, cfg.seed)
    correct = 0
    with torch.no_grad():
        for sample in splits.val:
            x = torch.from_numpy(image_to_tensor(sample.read(), spec))[None]
            correct += int(trainer.model(x).argmax()) == sample.label
    assert correct / len(splits.val) == pytest.approx(report["top1"], abs=1e-9)


def test_l1_shrinks_weights(tmp_path: Path, baseline: dict) -> None:
    l1 = trained_state(config(regularization={"l1": 1e-3}), tmp_path)
    assert weight_norm(l1, 1) < 0.8 * weight_norm(baseline, 1)


def test_weight_decay_shrinks_weights(tmp_path: Path, baseline: dict) -> None:
    decayed = trained_state(config(regularization={"weight_decay": 0.5}), tmp_path)
    assert weight_norm(decayed, 2) < 0.9 * weight_norm(baseline, 2)


def test_weight_decay_skips_norms_and_biases_in_the_optimizer() -> None:
    cfg = config(model={"arch": "simple_cnn"}, regularization={"weight_decay": 0.05})
    trainer = build_trainer(cfg, Path("unused"), load_splits(cfg.data, 0))
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    decay = {g["weight_decay"]: [names[id(p)] for p in g["params"]] for g in trainer.optimizer.param_groups}
    assert set(decay) == {0.0, 0.05}
    assert "features.1.weight" in decay[0.0] and "classifier.2.bias" in decay[0.0]  # BatchNorm, bias
    assert set(decay[0.05]) == {"features.0.weight", "features.4.weight", "classifier.2.weight"}


def test_no_decay_excludes_norm_and_bias() -> None:
    from training.models import create_model

    model = create_model(TrainConfig().model.model_copy(update={"arch": "simple_cnn"}), 3).model
    skip = no_decay_names(model)
    assert "features.1.weight" in skip and "features.1.bias" in skip  # BatchNorm2d
    assert "classifier.2.bias" in skip
    assert "features.0.weight" not in skip and "classifier.2.weight" not in skip


def test_dropout_is_active_in_training_only() -> None:
    cfg = config(model={"dropout": 0.5})
    trainer = build_trainer(cfg, Path("unused"), load_splits(cfg.data, 0))
    x = torch.randn(8, 1, 32, 32)
    trainer.model.train()
    assert not torch.allclose(trainer.model(x), trainer.model(x))
    trainer.model.eval()
    assert torch.allclose(trainer.model(x), trainer.model(x))


def test_label_smoothing_lowers_confidence(tmp_path: Path) -> None:
    sharp = train(config(epochs=4), tmp_path / "sharp")
    smooth = train(config(epochs=4, regularization={"label_smoothing": 0.3}), tmp_path / "smooth")
    # Smoothed targets keep the model from pushing probabilities to 1: it ends under-confident (T < 1).
    assert smooth["temperature"] < sharp["temperature"]


def test_mixup_and_cutmix_mix_images_and_labels() -> None:
    cfg = config(regularization={"mixup_alpha": 0.4, "cutmix_alpha": 1.0})
    trainer = build_trainer(cfg, Path("unused"), load_splits(cfg.data, 0))
    x, y = next(iter(trainer.train_loader))
    torch.manual_seed(0)
    mixed_x, soft_y = trainer.mixer(x, y)
    assert soft_y.shape == (len(y), 10)
    assert torch.allclose(soft_y.sum(1), torch.ones(len(y)))
    partner_differs = y != y.roll(1, 0)  # v2.MixUp/CutMix pair each image with its neighbour
    assert (soft_y.max(1).values[partner_differs] < 1).all()  # those labels are mixtures
    assert not torch.equal(mixed_x, x)


def test_training_with_mixup_runs(tmp_path: Path) -> None:
    report = train(config(epochs=2, regularization={"mixup_alpha": 0.2, "cutmix_alpha": 1.0}), tmp_path)
    assert report["top1"] > 0.3


def test_augmentation_changes_training_inputs_not_evaluation_inputs() -> None:
    cfg = config(
        model={"arch": "simple_cnn"},
        augment={"random_resized_crop": True, "hflip": 0.5, "policy": "trivial", "color_jitter": 0.4,
                 "random_erasing": 0.5},
    )
    trainer = build_trainer(cfg, Path("unused"), load_splits(cfg.data, 0))
    data = trainer.train_loader.dataset.samples[0].read()
    train_tf, eval_tf = trainer.train_loader.dataset.transform, trainer.val_loader.dataset.transform
    torch.manual_seed(0)
    views = [train_tf(data) for _ in range(5)]
    assert any(not torch.equal(views[0], v) for v in views[1:])
    assert torch.equal(eval_tf(data), eval_tf(data))
    spec_tensor = torch.from_numpy(image_to_tensor(data, build_spec(trainer)))
    assert torch.equal(eval_tf(data), spec_tensor)


def build_spec(trainer):
    from service.preprocessing import PreprocessSpec

    return PreprocessSpec.model_validate(trainer.meta["spec"])


def test_gradient_clipping_bounds_each_step(tmp_path: Path) -> None:
    common = {"optim": {"optimizer": "sgd", "lr": 1.0, "momentum": 0.0, "nesterov": False},
              "schedule": {"name": "constant"}, "epochs": 1}
    cfg = config(**common, regularization={"weight_decay": 0.0, "grad_clip_norm": 1e-4})
    trainer = build_trainer(cfg, tmp_path, load_splits(cfg.data, 0))
    before = torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters()])
    trainer.train_epoch(0)
    after = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    steps = len(trainer.train_loader)
    assert (after - before).norm() <= steps * 1.0 * 1e-4 * 1.001
    free = build_trainer(config(**common, regularization={"weight_decay": 0.0}), tmp_path, load_splits(cfg.data, 0))
    before = torch.cat([p.detach().flatten().clone() for p in free.model.parameters()])
    free.train_epoch(0)
    assert (torch.cat([p.detach().flatten() for p in free.model.parameters()]) - before).norm() > 100 * steps * 1e-4


def test_class_balance_options(tmp_path: Path) -> None:
    cfg = config(data={"class_balance": "loss"})
    trainer = build_trainer(cfg, tmp_path, load_splits(cfg.data, 0))
    assert trainer.criterion.weight is not None and trainer.criterion.weight.mean().item() == pytest.approx(1.0)
    cfg = config(data={"class_balance": "sampler"})
    trainer = build_trainer(cfg, tmp_path, load_splits(cfg.data, 0))
    assert type(trainer.train_loader.sampler).__name__ == "WeightedRandomSampler"


def _params(model: torch.nn.Module, head: bool, head_names: list[str]) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().clone() for n, p in model.named_parameters()
        if any(n.startswith(h + ".") for h in head_names) == head
    }


def test_linear_probe_freezes_backbone_and_bn_statistics(tmp_path: Path) -> None:
    cfg = config(model={"arch": "simple_cnn", "color_mode": "L"}, transfer={"strategy": "linear_probe"}, epochs=1)
    trainer = build_trainer(cfg, tmp_path, load_splits(cfg.data, 0))
    backbone, head = _params(trainer.model, False, trainer.head), _params(trainer.model, True, trainer.head)
    bn_mean = trainer.model.features[1].running_mean.clone()
    trainer.train_epoch(0)
    assert all(torch.equal(p, dict(trainer.model.named_parameters())[n]) for n, p in backbone.items())
    assert any(not torch.equal(p, dict(trainer.model.named_parameters())[n]) for n, p in head.items())
    assert torch.equal(bn_mean, trainer.model.features[1].running_mean)


def test_freeze_bn_keeps_statistics_while_weights_train(tmp_path: Path) -> None:
    cfg = config(model={"arch": "simple_cnn", "color_mode": "L"}, transfer={"freeze_bn": True}, epochs=1)
    trainer = build_trainer(cfg, tmp_path, load_splits(cfg.data, 0))
    conv = trainer.model.features[0].weight.detach().clone()
    bn_mean = trainer.model.features[1].running_mean.clone()
    trainer.train_epoch(0)
    assert torch.equal(bn_mean, trainer.model.features[1].running_mean)
    assert not torch.equal(conv, trainer.model.features[0].weight)
    unfrozen = build_trainer(config(model={"arch": "simple_cnn", "color_mode": "L"}, epochs=1), tmp_path,
                             load_splits(cfg.data, 0))
    unfrozen.train_epoch(0)
    assert not torch.equal(bn_mean, unfrozen.model.features[1].running_mean)


def test_fine_tune_trains_head_first_then_backbone_with_lower_lr(tmp_path: Path) -> None:
    cfg = config(model={"arch": "simple_cnn", "color_mode": "L"},
                 transfer={"strategy": "fine_tune", "head_epochs": 1, "backbone_lr_mult": 0.1}, epochs=2)
    trainer = build_trainer(cfg, tmp_path, load_splits(cfg.data, 0))
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs["backbone/decay"] == pytest.approx(0.1 * lrs["head/decay"])
    backbone = _params(trainer.model, False, trainer.head)
    trainer.train_epoch(0)
    assert all(torch.equal(p, dict(trainer.model.named_parameters())[n]) for n, p in backbone.items())
    trainer.train_epoch(1)
    assert any(not torch.equal(p, dict(trainer.model.named_parameters())[n]) for n, p in backbone.items())


def test_early_stopping_restores_the_best_checkpoint(tmp_path: Path) -> None:
    # min_delta larger than any possible improvement: epoch 1 stays best, patience 2 stops after epoch 3.
    cfg = config(epochs=10, early_stopping={"enabled": True, "monitor": "val_loss", "patience": 2, "min_delta": 100})
    report = train(cfg, tmp_path)
    assert report["stopped_early"] and report["epochs_run"] == 3 and report["best_epoch"] == 1
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert report["loss"] == pytest.approx(history[0]["val_loss"], rel=1e-5)  # the best model was restored


@pytest.mark.parametrize("schedule", ["cosine", "step", "onecycle", "plateau", "constant"])
def test_schedules(tmp_path: Path, schedule: str) -> None:
    cfg = config(epochs=3, schedule={"name": schedule, "warmup_epochs": 1 if schedule == "cosine" else 0,
                                     "step_size": 1, "gamma": 0.5})
    train(cfg, tmp_path)
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    if schedule == "constant":
        assert lrs[0] == lrs[-1] == cfg.optim.lr
    elif schedule == "step":
        assert lrs == pytest.approx([cfg.optim.lr * 0.5 ** (i + 1) for i in range(3)])
    elif schedule != "plateau":
        assert lrs[-1] < max(lrs)


class Interrupt(Exception):
    pass


def test_resume_is_exact(tmp_path: Path) -> None:
    cfg = config(epochs=4, regularization={"mixup_alpha": 0.2}, augment={"random_erasing": 0.3},
                 model={"dropout": 0.2})
    full = train(cfg, tmp_path / "full")

    def crash_after_two(row: dict) -> None:
        if row["epoch"] == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, tmp_path / "cut", callbacks=[crash_after_two])
    assert not (tmp_path / "cut" / "report.json").exists()
    resumed = train(cfg, tmp_path / "cut", resume=True)

    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=False)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for key in ("top1", "top5", "loss", "temperature", "confusion_matrix"):
        assert full[key] == resumed[key]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(a["history"]) == strip(b["history"])
