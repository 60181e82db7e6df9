"""Write ``fp32_runs.json``: fingerprints of the weights three small fp32 runs end with.

Generated from the training code before the redesign of issue 13 (commit c7da56a), and
regenerated once on purpose when stream mode dealt each epoch's images to per-rank batch slots
(issue 14: a rank holds only its share, and 1 and 2 ranks still train the same weights);
``tests/test_reference.py`` trains the same runs with today's code and compares, so a
refactor of the training core cannot change what training computes without a test failing.
Regenerate only when a change of the numbers is intended, and say so in the commit:

    .venv/bin/python -m tests.reference.make_reference
"""

from __future__ import annotations

import json
import tempfile
from functools import partial
from pathlib import Path

import torch

from tests.images import make_colour_folder

HERE = Path(__file__).resolve().parent
REFERENCE = HERE / "fp32_runs.json"

COMMON = dict(arch="resnet20_cifar", img_size=16, batch_size=8, progress=False, report=False,
              precision="fp32", leakage="off")  # fmt: skip
SCENARIOS: dict[str, dict] = {
    # From scratch: random augmentation, warm-up + cosine, label smoothing, precise BN.
    "scratch": dict(epochs=2, augment="standard", seed=3),
    # Finetune recipe from a weights file: head epoch from the feature cache, then gradual unfreezing.
    "finetune": dict(
        epochs=4,
        augment="none",
        recipe="finetune",
        head_epochs=1,
        stem_lr_ratio=0.1,  # the default when the reference was made (issue 16 raised it)
        unfreeze="gradual",
        lr=0.05,
        seed=1,
        init=True,
    ),  # fmt: skip
    # AdamW, one-cycle, MixUp + CutMix, class-weighted loss, gradient clipping.
    "mixing": dict(
        epochs=2,
        augment="light",
        optimizer="adamw",
        schedule="onecycle",
        mixup=0.2,
        cutmix=1.0,
        balance="weights",
        grad_clip=1.0,
        seed=2,
    ),  # fmt: skip
}


def fingerprint(state: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per tensor: sum, sum of squares and the first 8 values (as float64)."""
    out = {}
    for k in sorted(state):
        v = state[k].detach().double().reshape(-1)
        out[k] = [float(v.sum()), float((v * v).sum()), *map(float, v[:8])]
    return out


def run_scenario(name: str, root: Path, train_fn, config_cls, augment_cls) -> dict:
    """Train scenario ``name`` in ``root`` and return its fingerprint and val losses."""
    from safetensors.torch import load_file

    from resfit.models.weights import create_model

    kw = dict(SCENARIOS[name])
    data = make_colour_folder(root / "data", per_class=12, seed=5)
    if kw.pop("init", False):
        torch.manual_seed(0)
        torch.save(create_model("resnet20_cifar", num_classes=3).state_dict(), root / "init.pth")
        kw["weights"] = str(root / "init.pth")
    mix = {k: kw.pop(k) for k in ("mixup", "cutmix") if k in kw}
    if mix:
        kw["augment"] = augment_cls(kw.pop("augment"), **mix)
    result = train_fn(config_cls(data=str(data), out=str(root / name), **COMMON, **kw))
    state = load_file(str(root / name / "model.safetensors"))
    return {"weights": fingerprint(state), "val_loss": [r["val_loss"] for r in result.history]}


def main() -> None:
    from resfit.core.config import AugmentConfig
    from resfit.training import TrainConfig, train

    torch.set_num_threads(1)  # the same reductions on every machine
    ref = {}
    for name in SCENARIOS:
        with tempfile.TemporaryDirectory() as tmp:
            ref[name] = run_scenario(
                name, Path(tmp), train, partial(TrainConfig.from_options, threads=1), AugmentConfig
            )  # threads=1 as the test: a fair share of a busy machine would change the sums
    REFERENCE.write_text(json.dumps(ref, indent=1))
    print(f"wrote {REFERENCE}")


if __name__ == "__main__":
    main()
