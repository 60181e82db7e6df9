"""The hot path: one optimisation step, the optimizer and its schedule, and batched forward
passes. The training loop, ``lr-find``, gradient-flow analysis and the train-step benchmark all
step through :class:`TrainStep`, so what they measure is what training runs."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import runtime
from ..core.config import OptimConfig
from ..data.datasets import iter_batches


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms and biases: decaying them only hurts (they set scale and shift)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_optimizer(o: OptimConfig, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, nesterov=o.nesterov)
    if o.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr)


def lr_at(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based) of ``total``."""
    if schedule == "onecycle":
        peak = max(1, int(0.3 * total))
        if step < peak:
            return 0.04 + 0.96 * step / peak
        frac = (step - peak) / max(1, total - peak)
        return 0.5 * (1 + math.cos(math.pi * frac)) * (1 - 1e-4) + 1e-4
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    frac = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


@dataclass
class TrainStep:
    """Forward, loss, backward and update for one batch.

    ``scaler``: a GradScaler for fp16 (set by the AMP callback), so small gradients do not
    underflow. ``on_loss`` runs between the loss and the backward pass (the loop checks that
    the loss is finite there, before a bad step can touch the weights).
    """

    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    device: torch.device
    precision: str
    channels_last: bool = True
    grad_clip: float | None = None
    scaler: torch.amp.GradScaler | None = None
    on_loss: Callable[[Tensor], None] | None = None

    def __call__(self, net: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with runtime.autocast(self.device, self.precision):
            logits = net(x)
        loss = self.loss_fn(logits.float(), y)
        if self.on_loss is not None:
            self.on_loss(loss)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if self.grad_clip:
                self.scaler.unscale_(self.optimizer)  # clip the true gradients, not scaled ones
                nn.utils.clip_grad_norm_(net.parameters(), self.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if self.grad_clip:
                nn.utils.clip_grad_norm_(net.parameters(), self.grad_clip)
            self.optimizer.step()
        return logits, loss


def _to_input(x: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    x = x.to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    device: torch.device,
    precision: str,
    channels_last: bool = True,
) -> Tensor:
    """Logits for every item of ``dataset`` (eval mode, restored after)."""
    was_training = model.training
    model.eval()
    out = []
    n = len(dataset)
    for x, _ in iter_batches(
        dataset, [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    ):
        with runtime.autocast(device, precision):
            out.append(model(_to_input(x, device, channels_last)).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def recompute_bn_stats(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    n_images: int,
    batch_size: int,
    device: torch.device,
    precision: str,
    channels_last: bool,
) -> None:
    """Re-estimate the running statistics of every BatchNorm that is training ("precise BN").

    With few images the weights move faster than BN's running averages (momentum 0.1) can
    follow: on a 48-image test set the network scored 100 % in train mode and 33-67 % in eval
    mode. One extra forward pass over up to ``n_images`` training images (eval preprocessing),
    with a cumulative average, makes eval mode see the statistics of the final weights.
    """
    bns = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]
    if not bns or n_images <= 0:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the batches below
    n = min(n_images, len(dataset))
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:n]
    batches = [idx[i : i + batch_size] for i in range(0, n, batch_size)]
    for x, _ in iter_batches(dataset, [b for b in batches if len(b) > 1]):
        with runtime.autocast(device, precision):
            model(_to_input(x, device, channels_last))
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom
