"""`resfit demo`: the main job, offline, on real images that scikit-learn ships (its digits).

1. Train a CIFAR-style ResNet-20 from scratch on the digits 0-4.
2. Transfer it to the digits 5-9 with only a few images per class,
3. next to the same network trained from scratch on the same few images,
and print what the pretrained start buys on the held-out 5-9 images. Every number printed
comes from this run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.config import AugmentConfig
from ..core.errors import ConfigError
from ..runs import RunPaths
from ..training import train

log = logging.getLogger("resfit")


def write_digits(root: Path, shots: int, seed: int = 0) -> tuple[Path, Path]:
    """Write scikit-learn's 1,797 real 8x8 digit scans as PNG files in two image folders:
    ``pretrain/`` (digits 0-4, all) and ``fewshot/`` (digits 5-9: ``shots`` per class for
    train and for val, the rest as test)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    pre, few = root / "pretrain", root / "fewshot"
    for label in range(10):
        idx = rng.permutation(np.flatnonzero(digits.target == label))
        if label < 5:
            splits = {"": idx}
        else:
            splits = {"train": idx[:shots], "val": idx[shots : 2 * shots], "test": idx[2 * shots :]}
        for split, ids in splits.items():
            folder = (pre / str(label)) if label < 5 else (few / split / str(label))
            folder.mkdir(parents=True, exist_ok=True)
            for i in ids:
                pixels = (digits.images[i] * (255 / 16)).round().astype(np.uint8)
                Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png")
    return pre, few


def run_demo(
    out: str | Path = "runs/demo", quick: bool = False, shots: int = 5, seed: int = 0
) -> dict:
    """Run the demo in ``out`` (an earlier demo's folder there is replaced) and return what it
    measured: the pretraining's best val accuracy and, for ``transfer`` and ``scratch``, the
    test accuracy, the number of test images and the seconds. ``quick``: fewer epochs.
    ``seed`` picks the few training images and seeds every run."""
    out = Path(out)
    _clear_earlier_demo(out)
    data = out / "data"
    pre_data, few_data = write_digits(data, shots, seed)
    common = dict(
        arch="resnet20_cifar",
        img_size=16,  # the scans are 8x8: 16 px keeps every stage's maps non-trivial
        batch_size=32,
        progress=False,
        seed=seed,
    )
    # No flips: a mirrored digit is another symbol.
    pre_aug = AugmentConfig("standard", hflip=0.0, crop_scale=(0.7, 1.0))
    few_aug = AugmentConfig("light", hflip=0.0, crop_scale=(0.7, 1.0))
    t0 = time.perf_counter()
    print(f"seed {seed}")
    print(f"1/3 pretraining resnet20_cifar from scratch on the digits 0-4 ({data / 'pretrain'})")
    pre = train(
        data=str(pre_data),
        out=str(out / "pretrain"),
        epochs=3 if quick else 8,
        augment=pre_aug,
        **common,
    )
    t_pre = time.perf_counter() - t0

    few_epochs = 10 if quick else 30
    results = {}
    for name, weights in [
        ("transfer", str(RunPaths(out / "pretrain").model)),
        ("scratch", None),
    ]:
        step = "2/3 transferring the 0-4 network" if weights else "3/3 training from scratch"
        print(f"{step} to the digits 5-9 with {shots} images per class")
        t = time.perf_counter()
        r = train(
            data=str(few_data),
            out=str(out / name),
            weights=weights,
            epochs=few_epochs,
            # resfit's defaults for each start (from weights: the finetune recipe and the
            # head's rate; from scratch: the scratch rate): what a user typing this gets.
            augment=few_aug,
            **common,
        )
        results[name] = {
            "test_accuracy": r.test["accuracy"],
            "n": r.test["n"],
            "seconds": time.perf_counter() - t,
        }

    _print_results(out, few_data, shots, pre.best_val_accuracy, t_pre, results, t0)
    return {"pretrain_val_accuracy": pre.best_val_accuracy, **results}


def _clear_earlier_demo(out: Path) -> None:
    """Remove an earlier demo's folder at ``out`` (a rerun starts clean); refuse any other
    folder that is not empty."""
    if out.exists() and any(out.iterdir()):
        if not (out / "data" / "pretrain").is_dir():
            raise ConfigError(
                f"--out {out} is not empty and not an earlier demo: choose another folder"
            )
        import shutil

        shutil.rmtree(out)  # an earlier demo's folder: a rerun starts clean


def _print_results(out: Path, few_data: Path, shots: int, pre_accuracy: float, t_pre: float,
                   results: dict, t0: float) -> None:  # fmt: skip
    n_test = results["transfer"]["n"]
    print()
    print(f"pretraining on 0-4: best val accuracy {pre_accuracy:.3f} ({t_pre:.0f} s)")
    print(f"digits 5-9 with {shots} training images per class, tested on {n_test} held-out scans:")
    for name, label in [("transfer", "transfer from 0-4"), ("scratch", "from scratch")]:
        r = results[name]
        print(f"  {label:18s} test accuracy {r['test_accuracy']:.3f}   ({r['seconds']:.0f} s)")
    gain = results["transfer"]["test_accuracy"] - results["scratch"]["test_accuracy"]
    print(
        f"  the pretrained start is worth {100 * gain:+.1f} points; total {time.perf_counter() - t0:.0f} s"
    )
    print(
        f"runs in {out}/: try `resfit predict {out / 'transfer'} {few_data / 'test' / '7'} --top-k 2`"
    )
