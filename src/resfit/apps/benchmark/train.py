"""``resfit bench train``: one SGD step of the naive loop (torchvision model, fp32, NCHW)
against :class:`~resfit.training.step.TrainStep`, the step ``train()`` runs, from the same
weights on the same batch.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core import runtime
from ...core.config import TrainConfig
from ...tasks.single import SingleLabel
from ...training.step import TrainStep, make_optimizer, param_groups
from .common import (
    TORCHVISION_ARCHS,
    BenchReport,
    BenchRow,
    baseline_and_ours,
    bench_input_size,
    forward_gflop,
    gemm_roof,
    interleaved,
    machine_summary,
)

log = logging.getLogger("resfit")


# ---------------------------------------------------------------------------------------------
# Training step


def _naive_step(base_model: nn.Module, x: Tensor, y: Tensor, lr: float, wd: float) -> Callable:
    """The loop users write: train mode, fp32 NCHW, SGD over every parameter."""
    model = copy.deepcopy(base_model).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd)

    def step() -> float:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    return step


def _resfit_step(
    ours: nn.Module, x: Tensor, y: Tensor, lr: float, wd: float, precision: str,
    compiled: bool = False,
) -> Callable[[], Callable[[], float]]:  # fmt: skip
    """A builder of resfit's step: the TrainStep train() runs, with its optimizer groups."""

    def build() -> Callable[[], float]:
        model = copy.deepcopy(ours).train().to(memory_format=torch.channels_last)
        opt = make_optimizer(TrainConfig().optim, param_groups(model, wd), lr)  # Nesterov SGD
        # fp16 gets the loss scaling training adds (its GradScaling callback).
        scaler = torch.amp.GradScaler(x.device.type) if precision == "fp16" else None
        # No label smoothing: the first-step loss must equal the naive side's.
        step = TrainStep(opt, SingleLabel(label_smoothing=0.0).loss, x.device, precision,
                         scaler=scaler)  # fmt: skip
        net = torch.compile(model) if compiled else model
        return lambda: step(net, x, y)[1].item()

    return build


def bench_train_step(
    arch: str = "resnet50",
    *,
    batch: int = 32,
    img_size: int | None = None,
    num_classes: int = 10,
    repeats: int = 5,
    compile: bool = False,
    bf16: bool = True,
    device: str = "auto",
) -> BenchReport:
    """A training step (forward, loss, backward, SGD update), naive loop against resfit's.

    Naive: torchvision's model in train mode, fp32 NCHW, ``torch.optim.SGD`` over every
    parameter, ``F.cross_entropy``: the loop users write, kept naive on purpose (it is the
    baseline). resfit: :class:`~resfit.training.step.TrainStep`, the very step ``train()``
    runs (channels-last, autocast at the precision ``auto`` picks here, and bf16 for
    comparison, the task's loss), with resfit's optimizer and its groups (no weight decay on
    norms and biases). Same initial weights and batch, same lr, momentum and weight decay, no
    label smoothing on either side, so the first-step losses must agree (they are reported).
    Each step ends in ``loss.item()``, which also waits for a GPU to finish.
    """
    device = runtime.pick_device(device)
    base_model, ours = baseline_and_ours(arch, None, num_classes)
    base_model.to(device)
    ours.to(device)
    size = bench_input_size(arch, ours, img_size)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    gflop = 3 * forward_gflop(ours, (3, size, size))  # forward + backward (twice the forward)
    roof = gemm_roof(device=device)
    auto = runtime.pick_precision(device, "auto")
    report = BenchReport(
        f"{arch} training step on {device.type}, batch {batch}, {size} px, SGD",
        machine_summary(),
        roof,
        info={"GFLOP per image (fwd+bwd)": round(gflop, 2), "resfit auto precision": auto},
    )
    engines = _train_engines(arch, base_model, ours, x, y, auto, bf16=bf16, compile=compile)
    built = _warm_up_steps(engines, report)
    secs = interleaved({k: v[1] for k, v in built.items()}, repeats)
    after = gemm_roof(device=device)
    report.roof = {k: max(v, after[k]) for k, v in roof.items()}
    base_name = engines[0][0]
    for name, (precision, _, setup, first) in built.items():
        ips = batch / secs[name]
        report.rows.append(
            BenchRow(name, precision, ips, ratio=secs.get(base_name, math.nan) / secs[name],
                     roof_fraction=ips * gflop / report.roof.get(precision, math.nan),
                     setup_s=setup, first_loss=first)
        )  # fmt: skip
    return report


def _train_engines(arch: str, base_model: nn.Module, ours: nn.Module, x: Tensor, y: Tensor,
                   auto: str, *, bf16: bool, compile: bool) -> list[tuple[str, str, Callable]]:  # fmt: skip
    """(name, precision, builder) of every training step to time; the naive baseline first."""
    lr, weight_decay = 0.01, 5e-4  # both sides

    engines: list[tuple[str, str, Callable]] = [
        (
            f"naive {'torchvision ' if arch in TORCHVISION_ARCHS else ''}fp32 NCHW (baseline)",
            "fp32",
            lambda: _naive_step(base_model, x, y, lr, weight_decay),
        ),
        (f"resfit {auto} channels-last", auto, _resfit_step(ours, x, y, lr, weight_decay, auto)),
    ]
    if bf16 and auto != "bf16":
        engines.append(("resfit bf16 autocast channels-last", "bf16",
                        _resfit_step(ours, x, y, lr, weight_decay, "bf16")))  # fmt: skip
    if compile:
        engines.append((f"resfit {auto} + torch.compile", auto,
                        _resfit_step(ours, x, y, lr, weight_decay, auto, True)))  # fmt: skip
    return engines


def _warm_up_steps(
    engines: list[tuple[str, str, Callable]], report: BenchReport
) -> dict[str, tuple[str, Callable, float, float]]:
    """Build each step and take its first step (warm-up and compilation): name -> (precision,
    step, setup s, first loss). One that cannot run here is a row saying why."""
    built: dict[str, tuple[str, Callable, float, float]] = {}
    for name, precision, build in engines:
        t0 = time.perf_counter()
        try:
            step = build()
            first = step()
        except Exception as e:
            report.rows.append(BenchRow(name, precision, math.nan, note=f"skipped: {e}"[:140]))
            continue
        built[name] = (precision, step, time.perf_counter() - t0, first)
        log.info("  %s ready (%.1f s)", name, time.perf_counter() - t0)
    return built
