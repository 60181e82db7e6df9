"""``resfit audit DATA --out DIR``: which labels look wrong.

    from resfit.apps.audit import audit
    result = audit("photos/", out="audit", arch="resnet56_cifar", weights="resnet56_cifar.cifar10")
    result.issues[0]          # Issue(path=..., given='cat', suggested='dog', score=0.97, kind='label')

Every labelled image under ``DATA`` (all splits: a wrong test label makes the test score lie)
gets class probabilities from a model that did not see its label, from ``folds`` stratified
folds:

- frozen backbone (the default): one pass of the pretrained backbone over every image (the
  feature cache's computation) and ``folds`` logistic-regression heads on the stored features;
  seconds for thousands of images;
- ``--full-finetune``: ``folds`` trainings through :func:`resfit.train` (the finetune recipe
  from ``--weights``), each predicting its held-out fold: the slow path, for data far from what
  the backbone was trained on.

From those, :mod:`resfit.label_issues` finds the label issues (cleanlab's confident learning),
the near-duplicates with different labels and the outliers, and writes ``DIR/label_issues.csv``
(most likely wrong first), ``DIR/audit.html`` and ``DIR/audit.json``. See that module for the
methods and :file:`bench/audit.py` for the measured precision and recall.

This module sits above :mod:`resfit.training` (the full fine-tune trains); ``resfit train
--audit`` uses :mod:`resfit.label_issues` directly, below it.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..core.labels import CODINGS
from ..core.windows import parse_window, window_value

log = logging.getLogger("resfit")

__all__ = ["add_audit_parser", "audit"]


def _check_options(arch: str, folds: int, head: str) -> None:
    """Bad options, an unknown architecture and a missing extra answer before any image is
    read."""
    from ..models.resnet import get_spec
    from ..quality import label_issues as li
    from ..quality import out_of_fold

    if folds < 2:
        raise ConfigError(f"--folds must be at least 2, not {folds}")
    if head not in out_of_fold.HEADS:
        raise ConfigError(f"--head must be one of {', '.join(out_of_fold.HEADS)}, not {head!r}")
    get_spec(arch)  # an unknown architecture answers before any image is read
    li.import_cleanlab()  # so does a missing extra


def _check_labels(splits: Any, samples: list, full_finetune: bool, folds: int, where: str) -> None:
    """Every class has enough images for ``folds`` folds (multi-label: each label)."""
    from ..quality import label_issues as li

    if full_finetune and CODINGS.get(splits.task).float_targets:  # label sets
        raise ConfigError("--full-finetune audits single-label data; a multi-label manifest "
                          "is audited with the frozen backbone: drop --full-finetune")  # fmt: skip
    li.check_labels(_labels(samples), splits.classes, folds, where)


def audit(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    arch: str = "resnet18",
    weights: str | None = "pretrained",
    img_size: int | None = None,
    folds: int = 5,
    full_finetune: bool = False,
    epochs: int = 10,
    head: str = "torch",
    seed: int = 0,
    device: str = "auto",
    precision: str = "auto",
    max_distance: int = 4,
    progress: bool = True,
    window: str | None = None,
) -> Any:
    """Audit the labels of the images under ``data`` (a folder of class folders, a data root
    with train/ val/ test/, or a ``path,label[,split]`` CSV; a ``path,labels[,split]``
    multi-label manifest gets its missing and extra labels per image); write the files into
    ``out``. ``window``: the intensity window of DICOM and 16-bit images (``--window``: LEVEL,WIDTH
    or a preset), as training takes it.

    ``weights``: the backbone's pretrained weights (a registered name, ``pretrained`` or a
    file; None is a random backbone, useless here except with ``full_finetune``). ``head``:
    ``torch`` or ``sklearn`` logistic regression (the same objective; torch is faster).
    ``epochs``: per fold, with ``full_finetune``. ``max_distance``: pHash bits within which
    two images are the same picture (-1: no near-duplicate check). Returns a
    :class:`resfit.quality.label_issues.AuditResult`.
    """
    from ..quality import label_issues as li

    _check_options(arch, folds, head)
    from ..data.datasets import decode_all
    from ..data.discovery import discover
    from ..data.paths import display_path
    from ..training.finish import eval_decode_size
    from ..training.setup import build_transforms

    splits = discover(data, val_fraction=0.0, test_fraction=0.0, seed=seed)
    samples = splits.train + splits.val + splits.test
    where = display_path(data)
    _check_labels(splits, samples, full_finetune, folds, where)
    options = (data, out, arch, weights, img_size, seed, device, precision, progress, window)
    cfg, model = _seeded_model(_config(*options), splits, seed)
    _, ev_tf = build_transforms(cfg)
    decoded = decode_all(samples, eval_decode_size(cfg), progress=progress, desc="audit: decoding",
                         window=parse_window(cfg.data.window))  # fmt: skip
    dev, prec = _device(device, precision)
    meta = _meta(data, arch, weights, full_finetune, splits.skipped + decoded.skipped, window)
    common = dict(device=dev, precision=prec, folds=folds, seed=seed, max_distance=max_distance,
                  channels_last=cfg.runtime.channels_last, progress=progress, meta=meta,
                  where=where)  # fmt: skip
    if not full_finetune:
        return li.audit_images(model, decoded, ev_tf, cfg.classes, out, head=head, **common)
    return _audit_finetuned(cfg, model, decoded, ev_tf, out, pretrained=bool(weights),
                            epochs=epochs, device=dev, precision=prec, folds=folds, seed=seed,
                            max_distance=max_distance, progress=progress, meta=meta,
                            where=where)  # fmt: skip


def _meta(data: str | os.PathLike, arch: str, weights: str | None, full_finetune: bool,
          skipped: list, window: str | None = None) -> dict[str, Any]:  # fmt: skip
    """What the audit's summary says about how it was made (``window``: the --window the
    DICOM/16-bit images were decoded through, None for each file's own)."""
    return {"data": str(data), "model": f"{arch} ({weights or 'random init'})",
            "mode": "full-finetune" if full_finetune else "frozen backbone",
            "window": window, "skipped": [list(s) for s in skipped]}  # fmt: skip


def _seeded_model(cfg: Any, splits: Any, seed: int) -> tuple[Any, Any]:
    """The resolved config and its model, built under ``seed`` (a random backbone is the
    seed's); the caller's random state is left as it was."""
    import torch

    from ..training.setup import resolve

    with torch.random.fork_rng():  # the caller's random state is left as it was
        torch.manual_seed(seed)  # a randomly initialised backbone (weights=None) is the seed's
        return resolve(cfg, splits)


def _audit_finetuned(cfg: Any, model: Any, decoded: Any, ev_tf: Any, out: str | os.PathLike, *,
                     pretrained: bool, epochs: int, device: Any, precision: str, folds: int,
                     seed: int, max_distance: int, progress: bool, meta: dict,
                     where: str) -> Any:  # fmt: skip
    """``--full-finetune``: out-of-fold probabilities from fine-tuning the whole network per
    fold, then the same audit of them."""
    from ..quality import label_issues as li
    from ..quality import out_of_fold

    labels = decoded.labels.numpy()
    li.check_folds(labels, cfg.classes, folds, where)
    # Outliers need meaningful features: a pretrained backbone's, not a random one's.
    feats = out_of_fold.extract_features(model, decoded, ev_tf, device, precision, progress=progress) if pretrained else None  # fmt: skip
    probs = _finetune_oof(cfg, decoded, folds, seed, epochs, Path(out) / "folds", device, precision)
    return li.audit_probabilities(probs, labels, cfg.classes, decoded.paths, out, features=feats,
                                  max_distance=max_distance, meta={**meta, "folds": folds,
                                  "epochs": epochs, "seed": seed})  # fmt: skip


def _labels(samples: list) -> Any:
    import numpy as np

    return np.array([s.label for s in samples], dtype=np.int64)  # multi-hot rows: (N, K)


def _config(
    data: str | os.PathLike, out: str | os.PathLike, arch: str, weights: str | None,
    img_size: int | None, seed: int, device: str, precision: str, progress: bool,
    window: str | None = None,
) -> Any:  # fmt: skip
    from ..core.config import TrainConfig

    options = dict(data=str(data), out=str(out), arch=arch, weights=weights, seed=seed,
                   device=device, precision=precision, progress=progress)  # fmt: skip
    if img_size is not None:
        options["img_size"] = img_size
    if window:
        options["window"] = window
    return TrainConfig.from_options(**options).check()


def _device(device: str, precision: str) -> tuple[Any, str]:
    from ..core.runtime import pick_device, pick_precision

    dev = pick_device(device)
    return dev, pick_precision(dev, precision)


def _finetune_oof(
    cfg: Any, decoded: Any, folds: int, seed: int, epochs: int, root: Path, device: Any,
    precision: str,
) -> Any:  # fmt: skip
    """(N, K) probabilities: ``folds`` runs of :func:`resfit.train`, each on the other folds
    (its validation carved from them), each predicting its held-out fold."""
    import numpy as np
    import torch
    from sklearn.model_selection import StratifiedKFold

    from ..data.datasets import DecodedImages
    from ..data.paths import open_csv
    from ..inference.predictor import Predictor
    from ..training import train

    labels = decoded.labels.numpy()
    probs = np.zeros((len(labels), len(cfg.classes)))
    kfold = StratifiedKFold(folds, shuffle=True, random_state=seed)
    for k, (tr, te) in enumerate(kfold.split(np.zeros(len(labels)), labels)):
        folder = root / f"fold{k}"
        folder.mkdir(parents=True, exist_ok=True)
        manifest = folder / "manifest.csv"
        with open_csv(manifest, "w") as f:
            w = csv.writer(f)
            w.writerow(["path", "label"])
            for i in tr.tolist():
                w.writerow([str(Path(decoded.paths[i]).resolve()), cfg.classes[labels[i]]])
        log.info("audit: fold %d/%d, training on %d images", k + 1, folds, len(tr))
        train(cfg.replace(data=str(manifest), out=str(folder / "run"), epochs=epochs,
                          recipe="finetune" if cfg.model.weights else "plain",
                          val_fraction=0.1, leakage="off", report=False))  # fmt: skip
        pred = Predictor.from_run(folder / "run", device=str(device), precision=precision,
                                  engine="torch")  # fmt: skip
        held = DecodedImages([decoded.images[i] for i in te], torch.as_tensor(labels[te]),
                             [decoded.paths[i] for i in te], [], decoded.base_size)  # fmt: skip
        # The run's classes are the sorted names of its training rows: all of them here.
        probs[te] = pred.probabilities(pred.logits(held)).numpy()
    return probs


# -- the command ----------------------------------------------------------------------------------


def add_audit_parser(subparsers: Any) -> None:
    """``resfit audit``; this module (and torch) load only when it runs."""
    p = subparsers.add_parser(
        "audit", help="find the labels that look wrong (cleanlab), duplicates and outliers"
    )
    p.add_argument("data", help="a folder of class folders, a data root or a path,label CSV")
    p.add_argument(
        "--out", required=True, help="folder for label_issues.csv, audit.html, audit.json"
    )
    p.add_argument("--arch", default="resnet18", help="architecture (`resfit models`)")
    p.add_argument("--weights", default="pretrained",
                   help="pretrained weights: a registered name, 'pretrained' or a file")  # fmt: skip
    p.add_argument("--img-size", type=int, help="input size (default: the weights')")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    p.add_argument("--full-finetune", action="store_true",
                   help="train the whole network per fold (k trainings) instead of a head on frozen features")  # fmt: skip
    p.add_argument("--epochs", type=int, default=10, help="--full-finetune: epochs per fold")
    p.add_argument("--head", default="torch", choices=("torch", "sklearn"),
                   help="logistic-regression head on the frozen features")  # fmt: skip
    p.add_argument("--max-distance", type=int, default=4,
                   help="pHash bits within which two images are the same picture (-1: skip)")  # fmt: skip
    p.add_argument("--window", type=window_value, metavar="L,W",
                   help="DICOM and 16-bit PNG/TIFF: the intensity window LEVEL,WIDTH or a preset "
                        "(lung, bone, soft-tissue, brain), as for train (default: the DICOM "
                        "file's own window, else the whole range)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_cmd_audit)


def _cmd_audit(args: argparse.Namespace) -> int:
    from ..core import threads

    threads.configure(getattr(args, "threads", None))
    result = audit(
        args.data, args.out, arch=args.arch, weights=args.weights, img_size=args.img_size,
        folds=args.folds, full_finetune=args.full_finetune, epochs=args.epochs, head=args.head,
        seed=args.seed, device=args.device, max_distance=args.max_distance,
        progress=args.progress, window=args.window,
    )  # fmt: skip
    s = result.summary
    print(f"{s['label_issues']} label issue(s) in {s['images']} images (out-of-fold accuracy "
          f"{s['oof_accuracy']:.3f}), {len(s['near_duplicate_conflicts'])} conflicting "
          f"near-duplicate pair(s), {s['outliers']} outlier(s)")  # fmt: skip
    print(f"wrote {result.files['csv']} and {result.files['html']}")
    return 0
