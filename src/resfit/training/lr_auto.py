"""``--lr auto``: a short LR-finder sweep settles the learning rate, then the run trains with it
(:func:`~resfit.training.run.train` calls :func:`settle_lr` before anything else).

The sweep (:func:`~resfit.training.lr_find.lr_find`, 50 batches from 1e-7 to 10, under the
finetune recipe the head phase alone) writes ``RUN/lr_find.png``, ``.csv`` and ``.json``; the
run takes the steepest-descent rate, which goes into ``config.json`` like a given ``--lr``,
and the log and ``lr_find.json`` say so. An explicit ``--lr`` never sweeps. A resumed run keeps
the rate it chose.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..core.atomic import atomic_write_json
from ..core.config import TrainConfig
from ..runs import FileLog, RunPaths
from .lr_find import lr_find

log = logging.getLogger("resfit")

AUTO_STEPS = 50  # batches in the sweep: a few seconds for the head, an epoch or two otherwise


def settle_lr(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``--lr auto`` replaced by the rate a sweep picks (logged, plotted in the run
    folder); any other config as it is."""
    if cfg.optim.lr != "auto":
        return cfg
    out = Path(cfg.run.out)
    if RunPaths(out).started():
        return cfg  # a run is there: train() refuses it before anything is written
    out.mkdir(parents=True, exist_ok=True)
    with FileLog(out, True):
        res = lr_find(cfg, steps=AUTO_STEPS, out=out)
        chosen = res.suggestion
        summary = json.loads(RunPaths(out).lr_find_json.read_text())
        summary.update(rule="steepest descent", chosen=chosen)
        atomic_write_json(RunPaths(out).lr_find_json, summary, indent=1)
        log.info("--lr auto: lr %.3g (steepest descent of a %d-batch sweep; lowest loss at "
                 "%.3g): %s", chosen, len(res.lrs), res.lr_min, res.plot)  # fmt: skip
    return cfg.replace(lr=chosen)


__all__ = ["AUTO_STEPS", "settle_lr"]
