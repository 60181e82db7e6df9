"""The handlers of the ``resfit`` commands (:mod:`resfit.cli` builds the parser and calls them).

Each takes the parsed namespace, runs one call of the Python API and prints what it found;
returns the exit status. Each imports what it runs inside the function, so that ``resfit
--help`` and an argument error answer without importing torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ..core.config import OPTIONS, TrainConfig
from ..core.errors import ConfigError

# What `resfit bench` can time; `all` is every part (the CLI's own: its parser's choices).
BENCH_PARTS = ("all", "inference", "train", "pipeline", "deploy")  # all: the first three


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The config options the user gave on the command line, and only those, by flat name."""
    return {name: value for name, value in vars(args).items() if name in OPTIONS}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config of a parsed ``train``/``lr-find`` command line: the defaults with the given
    options, checked (a :class:`~resfit.core.errors.ConfigError` names a bad option)."""
    return TrainConfig.from_options(**given_options(args)).check()


def use_cores(args: argparse.Namespace) -> None:
    """Take this process's share of the CPU threads (``--threads``, else the fair share).
    Called once logging is set up, since it logs its choice; imports torch."""
    from ..core import threads

    threads.configure(getattr(args, "threads", None))


def cmd_models(args: argparse.Namespace) -> int:
    from ..models import resnet as models

    for name in models.list_models(include_plain=args.plain):
        spec = models.get_spec(name)
        print(f"{name:22s} {spec.family:9s} {'residual' if spec.residual else 'plain'}")
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    from ..models import weights

    for name in weights.list_weights(args.arch):
        w = weights.get_weights(name)
        top1 = w.metrics.get("top1")
        print(f"{name:32s} {w.num_classes:5d} classes  {w.input_size:4d}px  top1 {top1}%  {w.url}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    given = given_options(args)
    if not args.resume and "data" not in given:
        raise ConfigError("no training data given: resfit train DATA --out RUN")
    TrainConfig.from_options(**given).check()  # bad values answer before torch is imported
    use_cores(args)
    from ..training import train

    # Resuming, the run's saved config holds; train() applies the given options that may
    # change mid-run and refuses the others.
    result = train(resume=args.resume, **given)
    if result.history:
        from ..tasks.registry import TASKS

        task = result.config.data.task if result.config else "single"
        what = TASKS.get(task).metric_label if task in TASKS else "accuracy"
        print(f"best val {what} {result.best_val_accuracy:.4f} (epoch {result.best_epoch}); "
              f"run in {result.run_dir}")  # fmt: skip
    if result.test and "mAP" in result.test:
        print(f"test mAP {result.test['mAP']:.4f} on {result.test['n']} images")
    elif result.test:
        print(f"test accuracy {result.test['accuracy']:.4f} on {result.test['n']} images")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    given = given_options(args)
    TrainConfig.from_options(**given).check()  # bad values answer before torch is imported
    use_cores(args)
    from ..training.distill import distill

    teacher, student = given.pop("teacher"), given.pop("arch")
    result = distill(teacher, given.pop("data"), student=student, out=given.pop("out"),
                     **given)  # fmt: skip
    print(f"best val score {result.best_val_accuracy:.4f} (epoch {result.best_epoch}); "
          f"student run in {result.run_dir}")  # fmt: skip
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    given = given_options(args)
    TrainConfig.from_options(**given).check()  # bad values answer before torch is imported
    from ..data.shards import prepare

    data = args.data
    if args.frames_per_second:  # a folder of labelled videos: their frames, grouped by video
        from ..data.video import extract_frames

        data = extract_frames(args.data, f"{args.out.rstrip('/')}.frames", args.frames_per_second)
        print(f"frames of the videos in {args.data}: {data}")
    index = prepare(data, args.out, img_size=given.get("img_size") or 224,
                    workers=args.writers, quality=args.quality,
                    val_fraction=given.get("val_fraction", 0.15),
                    test_fraction=given.get("test_fraction", 0.0), seed=given.get("seed", 0),
                    task=given.get("task", "auto"), progress=given.get("progress", True),
                    group_by=given.get("group_by"), window=given.get("window"))  # fmt: skip
    counts = ", ".join(f"{s} {p['count']}" for s, p in index["splits"].items() if p["count"])
    print(f"prepared {counts} images ({len(index['skipped'])} skipped) in {args.out}: "
          f"resfit train {args.out} --out RUN")  # fmt: skip
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    use_cores(args)
    from ..training.lr_find import lr_find

    res = lr_find(cfg, start_lr=args.start_lr, end_lr=args.end_lr, steps=args.steps, out=args.out)
    print(f"suggested lr {res.suggestion:.2g} (steepest descent; lowest loss at {res.lr_min:.2g})")
    print(f"plot: {res.plot}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    use_cores(args)
    from ..insight.evaluation import evaluate

    res = evaluate(args.run, args.data, out=args.out, batch_size=args.batch_size,
                   device=args.device, precision=args.precision, progress=not args.json,
                   engine=args.engine, slice_by=args.slice_by)  # fmt: skip
    if args.json:
        print(json.dumps(res.summary()))
        return 0
    print("\n".join(res.text_lines()))  # each kind of result says what it measured
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    use_cores(args)
    from ..inference.predictor import Predictor, write_predictions_csv

    predictor = Predictor.from_run(
        args.run, device=args.device, precision=args.precision, engine=args.engine,
        tta=args.tta, compile=args.compile, **trust_options(args),
    )  # fmt: skip
    from ..data.video import is_video

    videos = [p for p in args.inputs if is_video(p)]
    if videos:
        return _predict_videos(predictor, videos, args)
    preds, skipped = predictor.predict(args.inputs, top_k=args.top_k, batch_size=args.batch_size)
    text = write_predictions_csv(args.out, preds, args.top_k)
    if args.out:
        print(f"wrote {len(preds)} predictions to {args.out}")
    else:
        # A file name that is not UTF-8 goes out as its bytes on disk, as in the CSV file.
        sys.stdout.flush()
        sys.stdout.buffer.write(text.encode("utf-8", "surrogateescape"))
        sys.stdout.buffer.flush()
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    return 0


def _predict_videos(predictor: Any, videos: list[str], args: argparse.Namespace) -> int:
    """``resfit predict RUN clip.mp4``: per-frame answers and events; with ``--out F.csv``
    the frames go to F.csv and the events to F.events.csv, else the events are printed."""
    from ..inference.video import predict_video, write_video_result

    if len(videos) != len(args.inputs):
        raise ConfigError("give videos or images to one resfit predict, not both")
    for i, video in enumerate(videos):
        res = predict_video(predictor, video, fps=args.fps, smooth_seconds=args.smooth,
                            batch_size=args.batch_size)  # fmt: skip
        if args.out:
            out = args.out if len(videos) == 1 else f"{Path(args.out).with_suffix('')}-{i}.csv"
            frames, events = write_video_result(res, out)
            print(f"{Path(video).name}: {len(res.times)} frames to {frames}, "
                  f"{len(res.events)} events to {events}")  # fmt: skip
        else:
            sys.stdout.write(res.events_csv())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import json

    use_cores(args)
    from ..export.run import export_run

    info = export_run(
        args.run, int8=args.int8, calib=args.calib, val=args.val, out=args.out,
        format=args.format, name=args.name, max_batch=args.max_batch,
        max_queue_delay_us=args.max_queue_delay_us,
    )  # fmt: skip
    print(json.dumps(info, indent=2))
    from ..training.tracking import log_exports

    if log_exports(args.run, args.out):  # a run trained with --track: its MLflow run gets them
        print(f"exports logged to the run's MLflow run (see {args.run}/tracking.json)")
    return 0


def _classes_to_explain(p: Any, class_name: str | None) -> list[str]:
    """The class(es) an overlay is drawn for: the one asked for; else the prediction's label,
    or for a multi-label run each predicted label (the most probable class when none is)."""
    if class_name:
        return [class_name]
    if p.labels is not None:
        return [name for name, _ in p.labels] or [p.top_k[0][0]]
    return [p.label]


def cmd_explain(args: argparse.Namespace) -> int:
    use_cores(args)
    from ..data.paths import display_text, find_images
    from ..inference.explain import overlay_file, overlay_stems
    from ..inference.predictor import Predictor

    predictor = Predictor.from_run(args.run, device="cpu", precision="fp32")
    if args.class_name and args.class_name not in predictor.classes:
        raise ConfigError(
            f"--class {args.class_name}: the run knows {', '.join(predictor.classes)}"
        )
    explain = predictor.explainer()
    preds, skipped = predictor.predict(find_images(args.inputs))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stems = overlay_stems([p.path for p in preds])  # a/cat.jpg and b/cat.jpg: two files
    for p in preds:
        for cls in _classes_to_explain(p, args.class_name):
            target = out / overlay_file(stems[os.fspath(p.path)], cls)
            explain(p.path, predictor.classes.index(cls)).save(target, format="PNG")
            print(
                display_text(f"{target}  predicted {p.label or '(no label)'} ({p.confidence:.2f})")
            )
    for path, reason in skipped:
        print(display_text(f"skipped {path}: {reason}"), file=sys.stderr)
    return 0


def cmd_gradient_flow(args: argparse.Namespace) -> int:
    use_cores(args)
    from .analysis import run_gradient_flow

    s = run_gradient_flow(
        args.archs, args.data, args.out, steps=args.steps, n_images=args.images, seed=args.seed
    )
    for arch, phases in s["archs"].items():
        for phase, d in phases.items():
            print(
                f"{arch:18s} {phase:14s} first/last block grad norm {d['first_last_ratio']:10.3g}"
                f"  spread {d['spread']:10.3g}  loss {d['loss']:.3f}"
            )
    print(f"plot: {s['png']}")
    return 0


def cmd_augment_preview(args: argparse.Namespace) -> int:
    given = {k: v for k, v in given_options(args).items() if OPTIONS[k].section == "augment"}
    aug = TrainConfig.from_options(**given).check().augment
    use_cores(args)
    from torchvision.io import write_png

    from ..data.augmentation import preview_grid
    from ..data.datasets import decode_all
    from ..data.discovery import discover
    from ..data.preprocessing import base_size_for
    from ..models.weights import IMAGENET_MEAN, IMAGENET_STD

    splits = discover(args.data, seed=args.seed)
    first: dict[int, Any] = {}  # one image per class
    for s in splits.train:
        first.setdefault(s.label, s)
    samples = list(first.values())[: args.rows]
    decoded = decode_all(samples, base_size_for(args.img_size), progress=False)
    grid = preview_grid(decoded.images, aug, args.img_size, IMAGENET_MEAN, IMAGENET_STD,
                        views=args.views, seed=args.seed)  # fmt: skip
    write_png(grid, args.out)
    print(f"wrote {args.out}: {len(samples)} images (first column: eval view) x {args.views} "
          f"augmented views, preset {aug.resolved(args.img_size).preset}")  # fmt: skip
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    use_cores(args)
    from .demo import run_demo

    run_demo(out=args.out, quick=args.quick, seed=args.seed)
    return 0


def _bench_deploy(args: argparse.Namespace) -> int:
    """``resfit bench deploy RUN``: the run's small-device exports against its PyTorch model."""
    if not args.run:
        raise ConfigError("resfit bench deploy needs the run folder: resfit bench deploy RUN")
    use_cores(args)
    from .benchmark.deploy import bench_deploy

    rep = bench_deploy(args.run, val=args.data, images=args.limit, repeats=max(args.repeats, 10))
    print(rep.format())
    if args.json:
        from ..core.atomic import atomic_write_json

        atomic_write_json(args.json, rep.to_dict(), indent=1)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "deploy":
        return _bench_deploy(args)

    what = list(BENCH_PARTS[1:4]) if args.what == "all" else [args.what]
    if "pipeline" in what and not args.data:
        if args.what == "pipeline":
            raise ConfigError("resfit bench pipeline needs --data DIR (a folder of class folders)")
        what.remove("pipeline")
        print("(the data pipeline needs --data DIR: skipped)\n")
    use_cores(args)
    from .benchmark import inference, pipeline, train

    reports = []
    step_rate = None
    for w in what:
        if w == "inference":
            rep = inference.bench_inference(
                args.arch, data=args.data, weights=args.weights, batch=args.batch,
                img_size=args.img_size, repeats=args.repeats, compile=args.compile,
                onnx=not args.no_onnx, openvino=not args.no_openvino, device=args.device,
                tensorrt=not args.no_tensorrt,
            )  # fmt: skip
        elif w == "train":
            rep = train.bench_train_step(
                args.arch, batch=args.batch, img_size=args.img_size, repeats=args.repeats,
                compile=args.compile, device=args.device,
            )  # fmt: skip
            fast = [r.images_per_s for r in rep.rows if r.name.startswith("resfit")]
            step_rate = max(fast) if fast else None
        else:
            rep = pipeline.bench_pipeline(
                args.data, img_size=args.img_size or 224, augment=args.augment,
                limit=args.limit, batch=args.batch, consumer_images_per_s=step_rate,
            )  # fmt: skip
        print(rep.format() + "\n", flush=True)
        reports.append(rep.to_dict())
    if args.json:
        from ..core.atomic import atomic_write_json

        atomic_write_json(args.json, reports, indent=1, default=str)
    return 0


def add_trust_arguments(p: Any) -> None:
    """``--conformal``, ``--conformal-method`` and ``--max-risk`` (predict and serve)."""
    p.add_argument("--conformal", type=float, metavar="COVERAGE",
                   help="add a prediction set (column/field 'set') that holds the true class for "
                        "this fraction of images like the validation set, e.g. 0.9")  # fmt: skip
    p.add_argument("--conformal-method", choices=("aps", "raps"), default="aps",
                   help="the conformal score (default: %(default)s; see the guide)")  # fmt: skip
    p.add_argument("--unknown-folder", metavar="DIR",
                   help="images known to be out of scope: the unknown threshold lets "
                        "--false-accept of them through (default: 95%% of validation accepted)")  # fmt: skip
    p.add_argument("--false-accept", type=float, default=0.05, metavar="RATE",
                   help="with --unknown-folder (default: %(default)s)")  # fmt: skip
    p.add_argument("--max-risk", type=float, metavar="RISK",
                   help="answer only where the error among answered images stays at most RISK "
                        "(e.g. 0.02; column/field 'accepted')")  # fmt: skip


def trust_options(args: Any) -> dict[str, Any]:
    """The keyword arguments of :meth:`Predictor.from_run` that those flags give."""
    return {"conformal": args.conformal, "max_risk": args.max_risk,
            "conformal_method": args.conformal_method, "unknown_folder": args.unknown_folder,
            "false_accept": args.false_accept}  # fmt: skip
