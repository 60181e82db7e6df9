"""After training (single-label): fit the unknown-input score on the training features, set
its threshold on validation, and keep the validation probabilities that conformal sets and
``--max-risk`` are calibrated on (``RUN/unknown.json`` + ``RUN/unknown.safetensors``)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.runtime import autocast
from ..data.datasets import DecodedImages, TransformedImages, iter_batches
from ..inference.stagestats import score_features
from ..inference.unknown import KNN_BANK, fit_detector
from ..models.adapters import adapt
from ..runs import write_unknown

log = logging.getLogger("resfit")

ACCEPT = 0.95  # the default threshold accepts this fraction of the validation images


@torch.inference_mode()
def features_and_logits(
    model: nn.Module, decoded: DecodedImages, transform, device: torch.device,
    indices: list[int] | None = None, batch_size: int = 128,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The unknown score's features (N, D + S: pooled, then the stages' statistics, see
    :func:`resfit.inference.stagestats.score_features`) and logits (N, C), fp32, of
    ``decoded`` images (or some)."""
    was_training = model.training
    model.eval()
    ad, idx = adapt(model), indices if indices is not None else list(range(len(decoded)))
    feats, logits = [], []
    data = TransformedImages(decoded, transform)
    for x, _ in iter_batches(
        data, [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    ):
        with autocast(device, "fp32"):
            f = score_features(ad, x.to(device))
            feats.append(f.cpu())
            logits.append(ad.head(f[:, : ad.num_features]).float().cpu())
    model.train(was_training)
    if not feats:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


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
    va_f, va_l = features_and_logits(model, val, transform, device)
    det = fit_detector(tr_f, tr_y, head.weight.detach().cpu().numpy(),
                       head.bias.detach().cpu().numpy(), name, val=(va_f, va_l))  # fmt: skip
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
