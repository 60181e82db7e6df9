"""The `resfit` command: a thin layer over the Python API. Every command maps to one call."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import models, weights
from .data import DataError
from .export import ExportError
from .inference import RunError
from .training import TrainConfig, TrainingError


def _cmd_models(args: argparse.Namespace) -> int:
    for name in models.list_models(include_plain=args.plain):
        spec = models.get_spec(name)
        print(f"{name:22s} {spec.family:9s} {'residual' if spec.residual else 'plain'}")
    return 0


def _cmd_weights(args: argparse.Namespace) -> int:
    for name in weights.list_weights(args.arch):
        w = weights.get_weights(name)
        top1 = w.metrics.get("top1")
        print(f"{name:32s} {w.num_classes:5d} classes  {w.input_size:4d}px  top1 {top1}%  {w.url}")
    return 0


def _add_train_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument(
        "data", help="image folder (train/ val/ test/ or class folders) or a CSV manifest"
    )
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument(
        "--arch",
        default=d.arch,
        help=f"architecture (default {d.arch}); `resfit models` lists them",
    )
    p.add_argument(
        "--weights", help="pretrained weights: a registered name, 'pretrained', or a file"
    )
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument(
        "--img-size", type=int, help="input size (default: the weights', else 224 or 32)"
    )
    p.add_argument(
        "--lr", type=float, help="peak learning rate (default: by optimizer and transfer)"
    )
    p.add_argument("--optimizer", default=d.optimizer, choices=["sgd", "adam", "adamw"])
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--schedule", default=d.schedule, choices=["cosine", "onecycle", "constant"])
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--grad-clip", type=float, help="clip the global gradient norm to this value")
    p.add_argument(
        "--early-stopping",
        type=int,
        metavar="PATIENCE",
        help="stop after this many epochs without a better val accuracy",
    )
    p.add_argument("--augment", default="standard", choices=["none", "light", "standard", "strong"])
    p.add_argument("--rotation", type=float, help="augmentation: max rotation in degrees")
    p.add_argument("--translate", type=float, help="augmentation: max shift, fraction of the size")
    p.add_argument("--hflip", type=float, help="augmentation: horizontal flip probability")
    p.add_argument("--vflip", type=float, help="augmentation: vertical flip probability")
    p.add_argument("--color-jitter", type=float, help="augmentation: colour jitter strength")
    p.add_argument("--mixup", type=float, help="augmentation: MixUp alpha (0 = off)")
    p.add_argument("--cutmix", type=float, help="augmentation: CutMix alpha (0 = off)")
    p.add_argument(
        "--freeze",
        default=d.freeze,
        choices=["none", "stem", "layer1", "layer2", "layer3", "layer4", "backbone"],
    )
    p.add_argument(
        "--train-bn", action="store_true", help="keep BatchNorm in the frozen part training"
    )
    p.add_argument(
        "--recipe",
        default=d.recipe,
        choices=["default", "finetune"],
        help="finetune: train the head with the backbone frozen, then unfreeze with lower "
        "per-stage learning rates",
    )
    p.add_argument(
        "--head-epochs",
        type=int,
        default=d.head_epochs,
        help=f"finetune: epochs (out of --epochs) for the head alone (default {d.head_epochs})",
    )
    p.add_argument(
        "--unfreeze",
        default=d.unfreeze,
        choices=["all", "gradual"],
        help="finetune: unfreeze all at once, or one stage per epoch from the top",
    )
    p.add_argument(
        "--stem-lr-ratio",
        type=float,
        default=d.stem_lr_ratio,
        help="finetune: the stem's learning rate as a fraction of the head's",
    )
    p.add_argument(
        "--cache",
        default=d.cache,
        choices=["auto", "memory", "disk", "off"],
        help="compute the frozen part once per image and train the rest from the stored "
        "features (disk: a memory map in RUN/cache)",
    )
    p.add_argument(
        "--cache-views",
        type=int,
        default=d.cache_views,
        help="with random augmentation: augmented views stored per image (fewer = faster, "
        f"less augmentation variety; default {d.cache_views})",
    )
    p.add_argument("--cache-dtype", default=d.cache_dtype, choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--in-chans", type=int, default=d.in_chans, choices=[1, 3])
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--test-fraction", type=float, default=d.test_fraction)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--deterministic", action="store_true")
    p.add_argument("--device", default=d.device)
    p.add_argument("--precision", default=d.precision, choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument(
        "--sync-bn", action="store_true", help="SyncBatchNorm across GPUs under torchrun"
    )
    p.add_argument(
        "--balance",
        choices=["weights", "sampler"],
        help="for uneven classes: weight the loss, or draw classes evenly",
    )
    p.add_argument(
        "--leakage",
        default=d.leakage,
        choices=["report", "remove", "off"],
        help="duplicates across splits (default: report)",
    )
    p.add_argument("--no-report", dest="report", action="store_false", help="skip report.html")
    p.add_argument(
        "--precise-bn",
        type=int,
        default=d.precise_bn,
        help="re-estimate BN statistics on this many train images per epoch (0 = off)",
    )
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--tensorboard", action="store_true")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")


_AUG_FLAGS = ("rotation", "translate", "hflip", "vflip", "color_jitter", "mixup", "cutmix")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    from .augmentation import AugmentConfig

    aug = AugmentConfig(args.augment, **{k: getattr(args, k) for k in _AUG_FLAGS})
    names = {f for f in TrainConfig.__dataclass_fields__} - {"augment", "classes", "mean", "std"}
    values = {k: getattr(args, k) for k in names if hasattr(args, k)}
    return TrainConfig(**values, augment=aug)


def _cmd_train(args: argparse.Namespace) -> int:
    from .training import train

    result = train(config_from_args(args), resume=args.resume)
    if result.history:
        print(
            f"best val accuracy {result.best_val_accuracy:.4f} (epoch {result.best_epoch}); run in {result.run_dir}"
        )
    if result.test:
        print(f"test accuracy {result.test['accuracy']:.4f} on {result.test['n']} images")
    return 0


def _cmd_lr_find(args: argparse.Namespace) -> int:
    from .transfer import lr_find

    res = lr_find(
        config_from_args(args),
        start_lr=args.start_lr,
        end_lr=args.end_lr,
        steps=args.steps,
        out=args.out,
    )
    print(f"suggested lr {res.suggestion:.2g} (steepest descent; lowest loss at {res.lr_min:.2g})")
    print(f"plot: {res.plot}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from .evaluation import evaluate

    res = evaluate(
        args.run,
        args.data,
        out=args.out,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        progress=not args.json,
    )
    if args.json:
        print(json.dumps(res.summary()))
    else:
        print(
            f"accuracy {res.accuracy:.4f}  top-5 {res.top5:.4f}  balanced {res.balanced_accuracy:.4f}  macro-F1 {res.macro_f1:.4f}  n={res.n}"
        )
        for row in res.per_class:
            print(
                f"  {row['class']:20s} precision {row['precision']:.3f} recall {row['recall']:.3f} f1 {row['f1']:.3f} n={row['support']}"
            )
        if res.skipped:
            print(f"skipped {len(res.skipped)} unreadable file(s)")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from .inference import Predictor, write_predictions_csv

    predictor = Predictor.from_run(
        args.run, device=args.device, precision=args.precision, engine=args.engine,
        tta=args.tta, compile=args.compile,
    )  # fmt: skip
    preds, skipped = predictor.predict(args.inputs, top_k=args.top_k, batch_size=args.batch_size)
    text = write_predictions_csv(args.out, preds, args.top_k)
    if args.out:
        print(f"wrote {len(preds)} predictions to {args.out}")
    else:
        sys.stdout.write(text)
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import json

    from .export import export_run

    info = export_run(args.run, int8=args.int8, calib=args.calib, val=args.val, out=args.out)
    print(json.dumps(info, indent=2))
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from .data import find_images
    from .inference import Predictor, make_explainer

    predictor = Predictor.from_run(args.run, device="cpu", precision="fp32")
    if args.class_name and args.class_name not in predictor.classes:
        raise ValueError(f"--class {args.class_name}: the run knows {', '.join(predictor.classes)}")
    explain = make_explainer(
        predictor.model, predictor.img_size, predictor.transform, predictor.device
    )
    paths = find_images(args.inputs)
    preds, skipped = predictor.predict(paths)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for p in preds:
        cls = args.class_name or p.label
        target = out / f"{Path(p.path).stem}.{cls}.png"
        explain(p.path, predictor.classes.index(cls)).save(target)
        print(f"{target}  predicted {p.label} ({p.confidence:.2f})")
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    return 0


def _cmd_gradient_flow(args: argparse.Namespace) -> int:
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


def _cmd_augment_preview(args: argparse.Namespace) -> int:
    from .augmentation import AugmentConfig, base_size_for, preview_grid
    from .data import decode_all, discover
    from .weights import IMAGENET_MEAN, IMAGENET_STD

    splits = discover(args.data, seed=args.seed)
    per_class: dict[int, list] = {}
    for s in splits.train:
        per_class.setdefault(s.label, [])
        if len(per_class[s.label]) < 1:
            per_class[s.label].append(s)
    samples = [s for v in per_class.values() for s in v][: args.rows]
    decoded = decode_all(samples, base_size_for(args.img_size), progress=False)
    cfg = AugmentConfig(args.augment, **{k: getattr(args, k) for k in _AUG_FLAGS})
    grid = preview_grid(
        decoded.images,
        cfg,
        args.img_size,
        IMAGENET_MEAN,
        IMAGENET_STD,
        views=args.views,
        seed=args.seed,
    )
    from torchvision.io import write_png

    write_png(grid, args.out)
    print(
        f"wrote {args.out}: {len(samples)} images (first column: eval view) x {args.views} augmented views, preset {args.augment}"
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out=args.out, quick=args.quick)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import json

    from . import benchmark

    what = ["inference", "train", "pipeline"] if args.what == "all" else [args.what]
    if "pipeline" in what and not args.data:
        if args.what == "pipeline":
            raise ValueError("resfit bench pipeline needs --data DIR (a folder of class folders)")
        what.remove("pipeline")
        print("(the data pipeline needs --data DIR: skipped)\n")
    reports = []
    step_rate = None
    for w in what:
        if w == "inference":
            rep = benchmark.bench_inference(
                args.arch, data=args.data, weights=args.weights, batch=args.batch,
                img_size=args.img_size, repeats=args.repeats, compile=args.compile,
                onnx=not args.no_onnx, device=args.device,
            )  # fmt: skip
        elif w == "train":
            rep = benchmark.bench_train_step(
                args.arch, batch=args.batch, img_size=args.img_size, repeats=args.repeats,
                compile=args.compile, device=args.device,
            )  # fmt: skip
            fast = [r.images_per_s for r in rep.rows if r.name.startswith("resfit")]
            step_rate = max(fast) if fast else None
        else:
            rep = benchmark.bench_pipeline(
                args.data, img_size=args.img_size or 224, augment=args.augment,
                limit=args.limit, batch=args.batch, consumer_images_per_s=step_rate,
            )  # fmt: skip
        print(rep.format() + "\n", flush=True)
        reports.append(rep.to_dict())
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=1, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resfit", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the architectures")
    p.add_argument("--no-plain", dest="plain", action="store_false", help="hide plain twins")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("weights", help="list the registered pretrained weights")
    p.add_argument("--arch", help="only the weights for this architecture")
    p.set_defaults(func=_cmd_weights)

    p = sub.add_parser("train", help="train a classifier on an image folder")
    _add_train_args(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "lr-find", help="sweep the learning rate, plot loss against it and suggest one"
    )
    _add_train_args(p)
    p.add_argument("--start-lr", type=float, default=1e-7)
    p.add_argument("--end-lr", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=100, help="batches in the sweep")
    p.set_defaults(func=_cmd_lr_find)

    p = sub.add_parser("eval", help="score a run on labelled images (top-1, top-5, per class)")
    p.add_argument("run")
    p.add_argument(
        "data", help="a folder of class folders, or a data root whose test/ split is used"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", help="folder for the metrics files (default RUN/eval-<data>)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("predict", help="predict new images with a run")
    p.add_argument("run")
    p.add_argument("inputs", nargs="+", help="files, folders (recursive) or globs")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--out", help="CSV file to write (default: print)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument(
        "--tta", action="store_true", help="test-time augmentation: average with the mirrored image"
    )
    p.add_argument(
        "--engine",
        default="torch",
        choices=["torch", "onnx"],
        help="onnx: run RUN/export/model.onnx (int8 with --precision int8)",
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the model (pays off on large folders)"
    )
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("export", help="export a run to ONNX, optionally int8")
    p.add_argument("run")
    p.add_argument("--format", default="onnx", choices=["onnx"])
    p.add_argument("--int8", action="store_true", help="static int8 quantization (needs --calib)")
    p.add_argument(
        "--calib", help="images to calibrate int8 on (a folder; a few hundred are enough)"
    )
    p.add_argument(
        "--val", help="labelled images to measure the accuracy change on (default: the run's data)"
    )
    p.add_argument("--out", help="folder (default RUN/export)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("explain", help="Grad-CAM overlays (PNG) of what the model looked at")
    p.add_argument("run")
    p.add_argument("inputs", nargs="+", help="files, folders or globs")
    p.add_argument("--out", default="explain", help="folder for the PNG files")
    p.add_argument(
        "--class", dest="class_name", help="explain this class (default: the prediction)"
    )
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser(
        "gradient-flow", help="per-block gradient norms: ResNets vs their plain twins"
    )
    p.add_argument("archs", nargs="+", help="e.g. resnet56_cifar plain56_cifar")
    p.add_argument(
        "--data", type=Path, help="a folder of class folders (default: scikit-learn's digits)"
    )
    p.add_argument("--out", type=Path, default=Path("gradient_flow"))
    p.add_argument("--steps", type=int, default=5, help="SGD steps before the second measurement")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_gradient_flow)

    p = sub.add_parser("augment-preview", help="write a PNG grid of augmented samples")
    p.add_argument("data")
    p.add_argument("--out", default="augment-preview.png")
    p.add_argument("--augment", default="standard", choices=["none", "light", "standard", "strong"])
    for flag in _AUG_FLAGS:
        p.add_argument("--" + flag.replace("_", "-"), type=float)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--rows", type=int, default=6)
    p.add_argument("--views", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_augment_preview)

    p = sub.add_parser(
        "bench", help="time inference engines, a training step and the data pipeline here"
    )
    p.add_argument(
        "what", nargs="?", default="all", choices=["all", "inference", "train", "pipeline"]
    )
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--weights", help="inference: weights to load (default: seeded random init)")
    p.add_argument("--data", help="image folder: real inputs for inference; needed by pipeline")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--img-size", type=int, help="default: the architecture's (224, CIFAR 32)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (the median is shown)")
    p.add_argument("--compile", action="store_true", help="add torch.compile rows (slow start)")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime engines")
    p.add_argument("--augment", default="standard", choices=["none", "light", "standard", "strong"])
    p.add_argument("--limit", type=int, default=512, help="pipeline: images to read")
    p.add_argument("--device", default="auto", help="auto (a GPU when present), cpu, cuda")
    p.add_argument("--json", help="also write the figures to this file")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser(
        "demo", help="the main job, offline: train, transfer and compare on real digits"
    )
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="fewer epochs (for the tests)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import os

    rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 reports progress
    # Other libraries at WARNING unless --verbose: the ONNX exporter's log every graph pass.
    root = logging.DEBUG if args.verbose else logging.WARNING
    logging.basicConfig(level=root, format="%(message)s", stream=sys.stderr)
    logging.getLogger("resfit").setLevel(root if args.verbose or not rank0 else logging.INFO)
    try:
        return args.func(args)
    except (
        ValueError,
        FileNotFoundError,
        weights.WeightsError,
        DataError,
        RunError,
        TrainingError,
        ExportError,
    ) as e:
        # Bad input ends in one clear line, not a traceback.
        print(f"resfit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
