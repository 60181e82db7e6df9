"""The features the unknown score reads: the pooled features (what the head sees, the
embedding ``resfit embed`` computes) followed by every stage's channel statistics.

    f = score_features(adapt(model), x)      # (N, D + S), fp32
    logits = adapt(model).head(f[:, :D])     # D = head.in_features

A stage's statistics are the mean and standard deviation over the image of each of its
channels (at most :data:`MAX_CHANNELS`, neighbouring channels averaged beyond that): the
low-level colour and texture statistics of the early stages tell photos unlike the training
data apart where the last stage's pooled features no longer do (measured in bench/unknown.py;
the Mahalanobis score on every stage of Lee et al. 2018). They cost one mean and one std per
stage on the forward pass that computes the pooled features anyway.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.adapters import ModelAdapter

__all__ = ["MAX_CHANNELS", "channel_stats", "score_features"]

# Bounds the statistics (2 x 64 per stage: 640 numbers for a ResNet-50's 5 stages), and with
# them the covariance the score keeps in the run folder (640^2 floats, 1.6 MB).
MAX_CHANNELS = 64


def channel_stats(h: Tensor) -> Tensor:
    """Per-channel mean and standard deviation over the image of a stage's output (N, 2C')."""
    h = h.float().flatten(2)  # N, C, HW
    if h.shape[1] > MAX_CHANNELS:  # neighbouring channels averaged: a fixed-size summary
        h = F.adaptive_avg_pool1d(h.transpose(1, 2), MAX_CHANNELS).transpose(1, 2)
    return torch.cat([h.mean(2), h.std(2, correction=0)], 1)


def score_features(ad: ModelAdapter, x: Tensor) -> Tensor:
    """Pooled features (N, D) followed by every stage's :func:`channel_stats`, fp32."""
    h, stats = x, []
    for name in ad.stage_names:
        h = ad.run_stage(name, h)
        stats.append(channel_stats(h))
    return torch.cat([ad.pool(h).float(), *stats], 1)
