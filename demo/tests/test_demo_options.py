"""The demo's options and training steps have observable effects (CPU, a few seconds each).

The end-to-end test in test_demo.py checks the outputs are well formed; these fail when the
fine-tuning or the pretraining stops changing the model, or when a demo flag is ignored.
"""

from __future__ import annotations

import json

import torch

import d2f_core
from d2f_core.objectives import evaluate_objective
from demo import data as ddata
from demo import run as demo_run
from demo.model import ClassEncoder, TinyUNet, UNetConfig
from demo.pretrain import pretrain_unet
from training import Trainer

SMALL = ["--batch", "6", "--samples", "6", "--grid", "1", "--sample-steps", "2", "--no-progress"]


def test_demo_flags_reach_the_trainer_and_fine_tuning_lowers_the_validation_loss(tmp_path, monkeypatch) -> None:
    """--steps, --batch, --lr, --rank, --seed configure the fine-tuning; the evaluated
    "after" model is the fine-tuned one, with a lower FM validation loss than zero-shot."""
    seen: list[Trainer] = []

    class SpyTrainer(Trainer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            seen.append(self)

    monkeypatch.setattr(demo_run, "Trainer", SpyTrainer)
    out = tmp_path / "out"
    args = ["--out", str(out), "--steps", "12", "--lr", "2e-3", "--rank", "3", "--seed", "4", *SMALL]
    assert demo_run.main(args) == 0
    (trainer,) = seen
    cfg = trainer.config
    assert (cfg.steps, cfg.batch_size, cfg.learning_rate, cfg.rank, cfg.seed) == (12, 6, 2e-3, 3, 4)
    assert trainer.step == 12 and len(trainer.losses) == 12
    assert {a.rank for a in trainer.adapters.values()} == {3}
    assert all(float(a.scale) == 1.0 for a in trainer.adapters.values())  # alpha = rank, as documented
    assert max(a.up.abs().max().item() for a in trainer.adapters.values()) > 0, "the LoRA did not train"
    result = json.loads((out / "metrics.json").read_text())
    before, after = result["before"]["fm_val_loss"], result["after"]["fm_val_loss"]
    assert after < 0.97 * before, f"fine-tuning did not lower the FM validation loss ({before:.4f} -> {after:.4f})"
    assert result["final_train_loss"] == trainer.losses[-1]


def test_pretraining_lowers_the_diffusion_loss() -> None:
    """Ten pretraining steps lower the diffusion loss on fixed draws well below the
    initialisation's (pretrain_unet seeds the initialisation from ``seed``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        unet, encoder = pretrain_unet("eps", 10, 16, 2e-3, seed=0)
    finally:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = UNetConfig()
    init_unet, init_encoder = TinyUNet(config), ClassEncoder(config)
    images, labels = ddata.select_classes(*ddata.load_digits_tensor(), ddata.PRETRAIN_CLASSES)
    gen = torch.Generator().manual_seed(5)
    idx = torch.randperm(images.shape[0], generator=gen)[:128]
    noise = torch.randn(128, *images.shape[1:], generator=gen)
    tau = torch.randint(0, 1000, (128,), generator=gen)
    d2f = d2f_core.Diff2Flow(d2f_core.scaled_linear(), "eps")
    with torch.no_grad():
        losses = {
            name: evaluate_objective("diffusion", u, d2f, images[idx], noise, tau, context=e(labels[idx])).loss.item()
            for name, (u, e) in {"init": (init_unet, init_encoder), "trained": (unet, encoder)}.items()
        }
    assert losses["trained"] < 0.8 * losses["init"], losses


def test_demo_progress_bars_count_one_kind_of_work_each(tmp_path, monkeypatch) -> None:
    """One bar per phase in its own unit (images sampled, training steps): a bar that mixes them
    shows a meaningless rate and ETA."""
    bars: list[tuple[str, str, int]] = []
    real = demo_run.Progress

    class SpyProgress(real):
        def __init__(self, total, label, unit="it", enabled=True) -> None:
            bars.append((label, unit, int(total)))
            super().__init__(total, label, unit=unit, enabled=False)

    monkeypatch.setattr(demo_run, "Progress", SpyProgress)
    assert demo_run.main(["--out", str(tmp_path / "out"), "--steps", "3", *SMALL]) == 0
    units = {label: unit for label, unit, _ in bars}
    assert units == {"zero-shot sampling": "img", "fine-tune": "step", "fine-tuned sampling": "img"}, bars
    assert ("fine-tune", "step", 3) in bars
