"""``resfit bench deploy RUN``: the deployment table of a run's small-device exports.

For every file ``resfit export --format executorch|litert|ncnn [--int8]`` left in
``RUN/export/``, run in its own runtime on this machine, against the run's PyTorch model (fp32,
eager: the baseline row) on the run's validation split: file size, top-1 accuracy change and
ECE change (15 bins, softmax of the raw logits), top-1 agreement, batch-1 latency with one
thread and with every thread, and images/s (batch 1, every thread: what one device answering
one camera does). CoreML is listed with its size only: it runs on Apple systems alone.

The table goes to ``RUN/export/deploy.json`` and, when the run has a report, into its
"Deploy" section (:func:`resfit.insight.report.add_deploy_section`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...core.atomic import atomic_write_json
from ...core.errors import DataError
from ...core.threads import available_cpus
from ...data.datasets import decode_all
from ...export.edge import file_size
from ...export.run import pick_samples, validation_samples
from ...inference.edge import edge_runner
from ...inference.predictor import Predictor
from ...runs import EDGE_FILES, RunPaths, load_run
from ...tasks.calibration import expected_calibration_error
from .common import cpu_name, median_time

__all__ = ["DeployReport", "DeployRow", "bench_deploy"]


@dataclass
class DeployRow:
    format: str
    precision: str
    size_mb: float
    top1_change: float | None = None  # accuracy points against PyTorch fp32 (fraction)
    ece_change: float | None = None
    agreement: float | None = None  # top-1 agreement with PyTorch fp32
    latency_1t_ms: float | None = None  # batch 1, one thread
    latency_all_ms: float | None = None  # batch 1, every thread
    images_per_s: float | None = None  # batch 1, every thread
    note: str = ""


@dataclass
class DeployReport:
    run: str
    machine: str
    threads: int
    val_source: str
    val_images: int
    accuracy: float
    ece: float
    rows: list[DeployRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        """The table as text, one row per format and precision."""
        head = f"{'format':<12}{'prec':<6}{'MB':>7}{'top-1 Δ':>9}{'ECE Δ':>8}{'agree':>8}"
        head += f"{'1t ms':>8}{f'{self.threads}t ms':>8}{'img/s':>8}{'x base':>8}"
        base = self.rows[0].images_per_s if self.rows else None
        lines = [
            f"deployment table of {self.run}",
            f"machine: {self.machine}, {self.threads} threads",
            f"on {self.val_images} images ({self.val_source}); PyTorch fp32 accuracy "
            f"{self.accuracy:.2%}, ECE {self.ece:.4f}",
            head,
        ]
        for r in self.rows:
            cells = [(r.top1_change, "{:+9.2%}"), (r.ece_change, "{:+8.4f}"), (r.agreement, "{:8.1%}"),
                     (r.latency_1t_ms, "{:8.2f}"), (r.latency_all_ms, "{:8.2f}"),
                     (r.images_per_s, "{:8.0f}")]  # fmt: skip
            cells.append((r.images_per_s / base if r.images_per_s and base else None, "{:8.2f}"))
            text = "".join(
                f.format(v) if v is not None else " " * len(f.format(0.0)) for v, f in cells
            )
            lines.append(f"{r.format:<12}{r.precision:<6}{r.size_mb:7.2f}{text}  {r.note}".rstrip())
        return "\n".join(lines)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _latency(fn: Any, one: np.ndarray, repeats: int) -> float:
    return median_time(lambda: fn(one), repeats=repeats, warmup=3).median * 1000


def _torch_runner(model: torch.nn.Module, threads: int) -> Any:
    def run(x: np.ndarray) -> np.ndarray:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                return model(torch.from_numpy(x)).numpy()
        finally:
            torch.set_num_threads(before)

    return run


def _row(fmt: str, precision: str, size: int, make: Any, threads: int, x: np.ndarray,
         y: np.ndarray, ref: tuple[float, float, np.ndarray], repeats: int) -> DeployRow:  # fmt: skip
    """One format's row: its logits on every image, then its batch-1 latencies. ``make(n)``
    makes a runner with ``n`` threads; one runner lives at a time (ExecuTorch's thread pool is
    one per process)."""
    runner = make(threads)
    logits = np.concatenate([runner(x[i : i + 64]) for i in range(0, len(x), 64)])
    tn = _latency(runner, x[:1], repeats)
    del runner
    t1 = _latency(make(1), x[:1], repeats)
    acc, ece, ref_pred = ref
    pred = logits.argmax(1)
    return DeployRow(fmt, precision, size / 1e6, float((pred == y).mean() - acc),
                     expected_calibration_error(_softmax(logits), y) - ece,
                     float((pred == ref_pred).mean()), t1, tn, 1000 / tn)  # fmt: skip


def bench_deploy(run: str | os.PathLike, *, val: str | os.PathLike | None = None,
                 images: int = 500, repeats: int = 30, write: bool = True) -> DeployReport:  # fmt: skip
    """Measure every small-device export of ``run`` (see the module's docstring)."""
    cfg, classes = load_run(run)
    paths = RunPaths(run)
    predictor = Predictor.from_run(run, device="cpu", precision="fp32", engine="torch")
    samples, source = validation_samples(run, cfg, classes, val)
    checked = decode_all(
        pick_samples(samples, images), predictor.base_size, progress=False, window=predictor.window
    )
    y = checked.labels.numpy() if len(checked) else np.zeros(0)
    if not len(checked) or y.ndim != 1:
        raise DataError(f"resfit bench deploy needs labelled validation images with one class "
                        f"each; found {len(checked)} ({source}): pass --data VAL")  # fmt: skip
    x = torch.stack([predictor.transform(img) for img in checked.images]).numpy()
    model = predictor.model.float().eval().cpu()
    threads = available_cpus()  # the cgroup's quota and RESFIT_CPUS too
    reference = _torch_runner(model, threads)  # 64 at a time: not every activation at once
    ref_logits = np.concatenate([reference(x[i : i + 64]) for i in range(0, len(x), 64)])
    acc = float((ref_logits.argmax(1) == y).mean())
    ece = expected_calibration_error(_softmax(ref_logits), y)
    report = DeployReport(str(run), cpu_name(), threads, source, len(x), acc, ece)
    ref = (acc, ece, ref_logits.argmax(1))
    torch_size = paths.model.stat().st_size
    report.rows.append(_row("pytorch", "fp32", torch_size, lambda n: _torch_runner(model, n),
                            threads, x, y, ref, repeats))  # fmt: skip
    report.rows[-1].note = "baseline: eager PyTorch, model.safetensors"
    for (fmt, precision), _ in EDGE_FILES.items():
        path = paths.edge(fmt, precision)
        if not path.exists():
            continue
        if fmt == "coreml":
            report.rows.append(DeployRow(fmt, precision, file_size(path) / 1e6,
                                         note="runs only on Apple systems: not measured"))  # fmt: skip
            continue

        def make(n: int, fmt: str = fmt, path: Path = path) -> Any:
            return edge_runner(fmt, path, n)

        report.rows.append(_row(fmt, precision, file_size(path), make, threads, x, y, ref, repeats))
    if write:
        atomic_write_json(paths.deploy, report.to_dict(), indent=1)
        if paths.report.is_file():
            from ...insight.report import add_deploy_section

            add_deploy_section(paths.report, report.to_dict())
    return report
