"""What a prediction adds when the model should not answer: the unknown flag and score,
the conformal set, and the selective-prediction decision (see docs/guide/trust-unknown.md).

:class:`Trust` is read from the run folder (``RUN/unknown.json`` + ``.safetensors``, written
at the end of training) by :class:`resfit.inference.predictor.Predictor`; a run trained
before these files existed still predicts, with one note in the log and no unknown columns.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..core.errors import ConfigError, RunError
from ..runs import read_unknown
from ..tasks.base import Task
from .conformal import Selective, conformal_threshold, prediction_sets, selective_threshold
from .unknown import UnknownDetector, auroc, fpr_at_95

log = logging.getLogger("resfit")

OLD_RUN_NOTE = (
    "{run} has no unknown-input score (trained before resfit fitted one, multi-label, "
    "or --unknown-score none): predictions carry no unknown flag; train again to get one"
)


@dataclass(frozen=True)
class Trust:
    """The run's fitted unknown score and calibration data, and what this session asks
    (``set_threshold`` for ``--conformal``, ``selective`` for ``--max-risk``)."""

    detector: UnknownDetector | None = None
    val_probs: np.ndarray | None = None
    val_labels: np.ndarray | None = None
    val_scores: np.ndarray | None = None
    conformal: float | None = None
    method: str = "aps"
    set_threshold: float | None = None
    selective: Selective | None = None

    @classmethod
    def from_run(cls, run: str | os.PathLike) -> Trust:
        """The run's files, or an empty Trust (and the note) for a run without them."""
        found = read_unknown(run)
        if found is None:
            log.info(OLD_RUN_NOTE.format(run=run))
            return cls()
        record, arrays = found
        try:
            state = {
                k.removeprefix("state."): v for k, v in arrays.items() if k.startswith("state.")
            }
            det = UnknownDetector(
                record["score"], state, float(record["threshold"]), record.get("how", "")
            )
            return cls(det, arrays["val_probs"], arrays["val_labels"], arrays.get("val_scores"))
        except (KeyError, TypeError, ValueError) as e:
            raise RunError(f"{run}/unknown.json: {e!r} is missing or wrong; train again") from None

    def configure(
        self, task: Task, *, conformal: float | None = None, max_risk: float | None = None,
        method: str = "aps",
    ) -> Trust:  # fmt: skip
        """This Trust with ``--conformal`` / ``--max-risk`` thresholds fitted on the run's
        validation probabilities; a clear error where the run or its task has none."""
        if conformal is None and max_risk is None:
            return self
        if task.sets_note:
            raise ConfigError(task.sets_note)
        if self.val_probs is None or self.val_labels is None:
            raise ConfigError(
                "--conformal and --max-risk need the validation probabilities that training "
                "keeps in RUN/unknown.safetensors: this run has none (train it again)"
            )
        out = replace(self, conformal=conformal, method=method)
        if conformal is not None:
            q = conformal_threshold(self.val_probs, self.val_labels, conformal, method)
            out = replace(out, set_threshold=q)
        if max_risk is not None:
            correct = self.val_probs.argmax(1) == self.val_labels
            sel = selective_threshold(self.val_probs.max(1), correct, max_risk)
            log.info("--max-risk %g: answers at confidence >= %.4f, which accepted %.1f %% of "
                     "the validation images (their error %.2f %%, bound %.2f %%)", max_risk,
                     sel.threshold, 100 * sel.accepted, 100 * sel.risk, 100 * sel.bound)  # fmt: skip
            out = replace(out, selective=sel)
        return out

    def with_unknown_images(self, scorer, decoded, folder, false_accept: float) -> Trust:
        """This Trust with its threshold at ``false_accept`` on ``decoded`` images known to be
        out of scope (``scorer``: Predictor.unknown_scores); logs AUROC and FPR@95TPR."""
        if self.detector is None:
            raise ConfigError(f"--unknown-folder {folder}: this run has no unknown-input score")
        if len(decoded) == 0:
            raise ConfigError(f"--unknown-folder {folder}: no readable images in it")
        _, scores = scorer(decoded)
        u = scores.numpy()
        det = self.detector.with_false_accept(u, false_accept)
        if self.val_scores is not None:
            log.info("unknown folder %s: AUROC %.4f, FPR at 95 %% TPR %.3f against the "
                     "validation images", folder, auroc(self.val_scores, u),
                     fpr_at_95(self.val_scores, u))  # fmt: skip
        log.info("unknown threshold %.4g: %s", det.threshold, det.how)
        return replace(self, detector=det)

    @property
    def needs_features(self) -> bool:
        return self.detector is not None and self.detector.needs_features

    def scores(self, feats: np.ndarray | None, logits: np.ndarray) -> np.ndarray | None:
        """The unknown score per image, None without a fitted score."""
        return None if self.detector is None else self.detector.score(feats, logits)

    def fields(
        self, probs: np.ndarray, scores: np.ndarray | None, classes: list[str]
    ) -> list[dict[str, Any]]:
        """Per image, what to add to its answer: ``unknown`` and ``unknown_score``, ``set``
        (class names, most probable first), ``accepted`` (``--max-risk``)."""
        out: list[dict[str, Any]] = [{} for _ in range(len(probs))]
        if scores is not None and self.detector is not None:
            for o, s in zip(out, scores, strict=True):
                o["unknown"], o["unknown_score"] = bool(s > self.detector.threshold), float(s)
        if self.set_threshold is not None:
            sets = prediction_sets(probs, self.set_threshold, self.method)
            for o, s in zip(out, sets, strict=True):
                o["set"] = [classes[j] for j in s]
        if self.selective is not None:
            for o, c in zip(out, probs.max(1), strict=True):
                o["accepted"] = bool(c >= self.selective.threshold)
        return out


def json_answer(task: Task, answer: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Serve's JSON for one image: the task's answer, ``unknown`` and ``score`` (an unknown
    image has ``label: null`` and its best guess in ``best_guess``), ``set``, ``accepted``."""
    out = dict(answer)
    if "unknown" in extra:
        if extra["unknown"]:
            out = task.abstain(out)
        out["unknown"], out["score"] = extra["unknown"], extra["unknown_score"]
    for key in ("set", "accepted"):
        if key in extra:
            out[key] = extra[key]
    return out
