"""After the last epoch (rank 0): keep the best model, calibrate it, write the report, score
the test split and summarise the run."""

from __future__ import annotations

import logging
from pathlib import Path

from torch import Tensor

from ..core.config import TrainConfig
from ..core.errors import DataError
from ..core.labels import ClassIndex, MultiHot
from ..data.datasets import TransformedImages
from ..data.preprocessing import decode_size
from ..data.samples import DataSplits
from ..insight.slices import SLICES_CSV, slice_lines, write_slices
from ..runs import (
    RunPaths,
    write_calibration,
    write_model,
    write_summary,
    write_thresholds,
)
from ..tasks import calibration
from ..tasks.registry import TASKS
from .callbacks import BestModel
from .loop import Loop
from .step import predict_logits
from .trust import fit_unknown

log = logging.getLogger("resfit")


def eval_decode_size(cfg: TrainConfig) -> int:
    """Shorter side that validation and test images are decoded at: the weights' own resize
    (torchvision V2: 232 for a 224 crop) where they state one."""
    return decode_size(cfg.model.img_size, cfg.pre.resize_size)


def finish_run(
    cfg: TrainConfig,
    loop: Loop,
    splits: DataSplits,
    skipped: list,
    duplicates: list,
    ev_tf,
    show: bool,
) -> dict | None:
    """Write model.safetensors, calibration.json, report.html, eval-test/ and summary.json;
    returns the test score, if there is a test split."""
    from safetensors.torch import load_file

    out, model = Path(cfg.run.out), loop.eval_model
    best = loop.callback(BestModel)
    best_path = RunPaths(out).best
    if best_path.exists():
        model.load_state_dict(load_file(str(best_path)))
    write_model(out, model.state_dict(), {"arch": cfg.model.arch, "epoch": str(best.best_epoch)})
    # The frozen prefix is the same in the best weights: cached val features still hold.
    val_logits = loop.val_logits(model)
    # How the labels are held picks the calibration, report and test scores.
    finish = _FINISH[type(TASKS.get(cfg.data.task).coding)]
    test = finish(cfg, loop, splits, val_logits, ev_tf, show, skipped, duplicates)
    summary = {"best_epoch": best.best_epoch, "best_val_accuracy": best.best,
               "monitor": best.monitor, "epochs_run": len(loop.history), "test": test}  # fmt: skip
    if loop.not_saved:  # said at the end, where it is read: the log lines went by long ago
        summary["not_saved"] = list(loop.not_saved.values())
        for entry in summary["not_saved"]:
            log.warning("not saved: %s (last tried after epoch %d: %s)", entry["file"],
                        entry["epochs"][-1], entry["error"])  # fmt: skip
    write_summary(out, summary)
    log.info("best validation %s %.4f at epoch %d; run saved in %s",
             best.monitor.removeprefix("val_").replace("acc", "accuracy"), best.best,
             best.best_epoch, out)  # fmt: skip
    return test


def calibrate(out: Path, val_logits: Tensor, val_labels: Tensor) -> calibration.Calibration:
    """Temperature scaling fitted on the validation set, kept only where it lowers the
    calibration error there (else T = 1, and the log says why); ``predict`` applies it."""
    c = calibration.calibrate_temperature(val_logits, val_labels)
    record = {**c.to_dict(), "fitted_on": "validation"}
    write_calibration(out, record)
    log.info("calibration: %s", c.reason)
    return c


def _audit_training_labels(cfg: TrainConfig, loop: Loop, splits, ev_tf, show: bool) -> dict | None:
    """``--audit``: the training split's labels, audited with a frozen backbone into RUN/audit.
    The starting weights, where there are any, have not seen these labels; a network trained
    from scratch has, and tends to agree with its own training labels (fewer issues found)."""
    from ..models.weights import create_model
    from ..quality.label_issues import audit_images

    m, s = cfg.model, loop.step
    if m.weights:
        model = create_model(m.arch, weights=m.weights, in_chans=m.in_chans, progress=False)
    else:
        log.info("audit: no --weights, so the trained network's features: it has fit these labels")
        model = loop.eval_model
    meta = {"model": f"{m.arch} ({m.weights or 'this run, trained from scratch'})",
            "data": f"{cfg.data.path} (train split)"}  # fmt: skip
    train = loop.data.train.decoded
    ids = getattr(train, "ids", None)
    if loop.dist.world > 1 or (ids is not None and len(set(ids)) != len(ids)):
        # This rank holds its share (or a small set dealt twice): audit every image once.
        train = loop.source.open(splits.train, eval_decode_size(cfg), progress=show,
                                 desc="audit: opening the training split")  # fmt: skip
    try:
        result = audit_images(model, train, ev_tf, cfg.classes,
                              Path(cfg.run.out) / "audit", device=s.device, precision=s.precision,
                              seed=cfg.runtime.seed, channels_last=s.channels_last, progress=show,
                              meta=meta, where=f"the training split of {cfg.data.path}")  # fmt: skip
    except DataError as e:  # the trained model is worth more than the audit: keep the run
        log.warning("audit skipped: %s", e)
        return None
    return {"html": "audit/audit.html", "csv": "audit/label_issues.csv", **result.summary}


def _write_report(
    cfg, loop, splits, val_logits, cal, skipped, duplicates, ev_tf, audit=None, unknown=None,
    slices: list[dict] | None = None,
) -> None:  # fmt: skip
    from ..inference.predictor import make_explainer
    from ..insight.report import ReportData, write_report

    val = loop.data.val.decoded
    data = ReportData(
        title=f"{cfg.model.arch} on {Path(cfg.data.path).name}: validation",
        class_names=cfg.classes,
        y_true=val.labels.numpy(),
        logits=val_logits.numpy(),
        paths=[str(p) for p in val.paths],
        history=loop.history,
        config=cfg.to_dict(),
        temperature=cal.temperature,
        calibration=cal,
        data_summary={
            "counts": splits.counts(),
            "skipped": skipped,
            "duplicates": duplicates,
            "notes": [f"{s}: {o}" for s, o in splits.origins.items()]
            + (slice_lines(cfg.data.slice_by, slices) if slices else []),
            "audit": audit,
        },  # fmt: skip
        explain=make_explainer(
            loop.eval_model,
            cfg.model.img_size,
            ev_tf,
            loop.step.device,
            base_size=eval_decode_size(cfg),
            window=loop.source.window,
        ),  # fmt: skip
        split="validation",
        unknown=unknown,
    )
    path = write_report(RunPaths(cfg.run.out).report, data)
    log.info("report: %s", path)


def _slices(cfg, paths, y_true, logits: Tensor, temperature: float | None) -> list[dict] | None:
    """``--slice-by``: an evaluated split's figures per group (None without the option); a
    column that cannot be read is a warning here, never a lost run."""
    if not cfg.data.slice_by:
        return None
    import torch

    from ..data.groups import read_values
    from ..insight.slices import slice_metrics

    try:
        values = read_values(cfg.data.path, [Path(p) for p in paths], cfg.data.slice_by)
    except DataError as e:
        log.warning("--slice-by: %s", e)
        return None
    probs = torch.softmax(logits.float() / (temperature or 1.0), dim=1).numpy()
    return slice_metrics(values, y_true, probs, cfg.classes)


def _evaluate_test(cfg, loop, splits, ev_tf, show, temperature) -> dict:
    from ..insight.evaluation import compute_metrics, write_eval

    test_data = loop.source.open(splits.test, eval_decode_size(cfg), progress=show,
                                 desc="decoding test")  # fmt: skip
    s = loop.step
    logits = predict_logits(loop.eval_model, TransformedImages(test_data, ev_tf), 64, s.device,
                            s.precision, s.channels_last)  # fmt: skip
    res = compute_metrics(logits, test_data.labels, cfg.classes, [str(p) for p in test_data.paths])
    res.task_scores = loop.task.eval_scores(logits, test_data.labels)  # none for built-in tasks
    slices = _slices(cfg, test_data.paths, res.y_true, logits, temperature)
    if slices is not None:  # write_eval writes them: RUN/eval-test/slices.csv, metrics.json
        res.slice_by, res.slices = cfg.data.slice_by, slices
    write_eval(res, RunPaths(cfg.run.out).eval("test"), temperature)
    log.info("test accuracy %.4f on %d images", res.accuracy, res.n)
    for line in slice_lines(cfg.data.slice_by, slices) if slices else []:
        log.info("test %s", line)
    return {"accuracy": res.accuracy, "n": res.n, "top5": res.top5, **res.task_scores}


def calibrate_multilabel(
    out: Path, val_logits: Tensor, val_targets: Tensor, classes: list[str]
) -> calibration.MultiLabelCalibration:
    """A temperature and an F1-maximising threshold per class, fitted on validation:
    ``calibration.json`` holds both (temperatures in class order), ``thresholds.json`` the
    thresholds by class name, for users to read and edit; ``predict`` applies them."""
    c = calibration.calibrate_multilabel(val_logits, val_targets)
    write_calibration(out, {**c.to_dict(), "fitted_on": "validation"})
    thresholds = dict(zip(classes, c.thresholds, strict=True))
    write_thresholds(out, thresholds)
    log.info("calibration: %s", c.reason)
    return c


def _finish_one_label(
    cfg, loop, splits, val_logits, ev_tf, show, skipped, duplicates
) -> dict | None:
    """One label per image: temperature scaling on validation, report, score the test split."""
    cal = calibrate(Path(cfg.run.out), val_logits, loop.data.val.decoded.labels)
    unknown = fit_unknown(Path(cfg.run.out), cfg.run.unknown_score, loop.eval_model,
                getattr(loop.data.train, "decoded", None), loop.data.val.decoded, ev_tf,
                loop.step.device, cal.temperature)  # fmt: skip
    audit = _audit_training_labels(cfg, loop, splits, ev_tf, show) if cfg.run.audit else None
    val = loop.data.val.decoded
    slices = _slices(cfg, val.paths, val.labels.numpy(), val_logits, cal.temperature)
    if slices is not None:  # validation's figures per group, as the test split's
        folder = RunPaths(cfg.run.out).eval("val")
        folder.mkdir(parents=True, exist_ok=True)
        write_slices(folder / SLICES_CSV, cfg.data.slice_by, slices)
    if cfg.run.report:
        _write_report(cfg, loop, splits, val_logits, cal, skipped, duplicates, ev_tf, audit,
                      unknown, slices)  # fmt: skip
    return _evaluate_test(cfg, loop, splits, ev_tf, show, cal.temperature) if splits.test else None


def _finish_multilabel(cfg, loop, splits, val_logits, ev_tf, show, *_) -> dict | None:
    """Multi-label: calibrate and tune thresholds on validation, report, score the test split."""
    from ..insight.evaluation import compute_multilabel_metrics, write_multilabel_eval

    out, val = Path(cfg.run.out), loop.data.val.decoded
    cal = calibrate_multilabel(out, val_logits, val.labels, cfg.classes)
    audit = _audit_training_labels(cfg, loop, splits, ev_tf, show) if cfg.run.audit else None
    if cfg.run.report:
        res = compute_multilabel_metrics(val_logits, val.labels, cfg.classes,
                                         [str(p) for p in val.paths], cal.temperature,
                                         cal.thresholds)  # fmt: skip
        _write_multilabel_report(cfg, loop, res, ev_tf, cal.reason, audit)
    if not splits.test:
        return None
    test_data = loop.source.open(splits.test, eval_decode_size(cfg), progress=show,
                                 desc="decoding test")  # fmt: skip
    s = loop.step
    logits = predict_logits(loop.eval_model, TransformedImages(test_data, ev_tf), 64, s.device,
                            s.precision, s.channels_last)  # fmt: skip
    res = compute_multilabel_metrics(logits, test_data.labels, cfg.classes,
                                     [str(p) for p in test_data.paths], cal.temperature,
                                     cal.thresholds)  # fmt: skip
    write_multilabel_eval(res, RunPaths(out).eval("test"))
    log.info("test mAP %.4f, micro-F1 %.4f on %d images", res.mAP, res.micro_f1, res.n)
    return {k: v for k, v in res.summary().items() if k != "per_class"}


def _write_multilabel_report(cfg, loop, res, ev_tf, note: str, audit: dict | None) -> None:
    from ..inference.predictor import make_explainer
    from ..insight.report_multilabel import MultiLabelReportData, write_multilabel_report

    explain = make_explainer(loop.eval_model, cfg.model.img_size, ev_tf, loop.step.device,
                             base_size=eval_decode_size(cfg), window=loop.source.window)  # fmt: skip
    title = f"{cfg.model.arch} on {Path(cfg.data.path).name}: validation"
    data = MultiLabelReportData(title, res, explain, history=loop.history, notes=[note],
                                audit=audit)  # fmt: skip
    log.info("report: %s", write_multilabel_report(RunPaths(cfg.run.out).report, data))


__all__ = ["calibrate", "calibrate_multilabel", "finish_run"]


_FINISH = {ClassIndex: _finish_one_label, MultiHot: _finish_multilabel}
