"""After training (single-label): fit the unknown-input score on the training features, set
its threshold on validation, and keep the validation probabilities that conformal sets and
``--max-risk`` are calibrated on (``RUN/unknown.json`` + ``RUN/unknown.safetensors``)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.datasets import DecodedImages, subset
from ..inference.unknown import KNN_BANK, fit_detector
from ..models.adapters import adapt
from ..quality import out_of_fold
from ..runs import write_unknown

log = logging.getLogger("resfit")

ACCEPT = 0.95  # the default threshold accepts this fraction of the validation images


def features_and_logits(
    model: nn.Module, decoded: DecodedImages, transform, device: torch.device,
    indices: list[int] | None = None, batch_size: int = 128,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Pooled features (N, D) and logits (N, C), fp32, of ``decoded`` images (or some): the
    features from :func:`resfit.quality.out_of_fold.extract_features` (the feature cache's
    computation, resfit's one), the logits from them through the classifier."""
    data = decoded if indices is None else subset(decoded, indices)
    if len(data) == 0:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    # channels_last off: the trained model is left as it is (Module.to changes it in place);
    # the random state too (the feature cache seeds its views).
    with torch.random.fork_rng(devices=[]):
        feats = out_of_fold.extract_features(model, data, transform, device, "fp32",
                                             channels_last=False, batch_size=batch_size)  # fmt: skip
    with torch.inference_mode():
        head = adapt(model).head
        logits = head(torch.from_numpy(feats).to(head.weight.device)).float().cpu().numpy()
    return feats, logits


def fit_unknown(
    out: Path,
    name: str,
    model: nn.Module,
    train: DecodedImages | None,
    val: DecodedImages,
    transform,
    device: torch.device,
    temperature: float,
) -> dict | None:
    """Fit score ``name`` and write it (with the calibrated validation probabilities) through
    :func:`resfit.runs.write_unknown`; returns its record with the validation scores (for
    the report), None with a note in the log where it cannot be fitted."""
    if name == "none":
        return None
    if train is None or len(train) == 0 or len(val) == 0:
        log.info("unknown score: not fitted (needs the training and validation images here)")
        return None
    step = max(1, -(-len(train) // KNN_BANK))  # an even spread of at most KNN_BANK images
    tr_f, _ = features_and_logits(model, train, transform, device, list(range(0, len(train), step)))
    tr_y = train.labels[::step].numpy()
    head = adapt(model).head
    det = fit_detector(tr_f, tr_y, head.weight.detach().cpu().numpy(),
                       head.bias.detach().cpu().numpy(), name)  # fmt: skip
    va_f, va_l = features_and_logits(model, val, transform, device)
    val_scores = det.score(va_f, va_l)
    det = det.with_threshold(val_scores, ACCEPT)
    probs = torch.softmax(torch.from_numpy(va_l) / temperature, 1).numpy()
    record = {"score": name, "threshold": det.threshold, "how": det.how, "accept": ACCEPT,
              "fitted_on": f"{len(tr_f)} training images; threshold on {len(va_f)} validation images"}  # fmt: skip
    arrays = {**{f"state.{k}": np.ascontiguousarray(v) for k, v in det.state.items()},
              "val_scores": val_scores.astype(np.float32), "val_probs": probs.astype(np.float32),
              "val_labels": val.labels.numpy().astype(np.int64)}  # fmt: skip
    write_unknown(out, record, arrays)
    log.info("unknown score %s: threshold %.4g %s", name, det.threshold, det.how)
    return {**record, "val_scores": val_scores}
