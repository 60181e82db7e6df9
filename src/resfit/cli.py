"""The `resfit` command: a thin layer over the Python API. Every command maps to one call.

The options of ``train`` and ``lr-find`` are generated from :data:`resfit.core.config.OPTIONS`, one
argument group per config section, so an option's help, type, choices and default are written
once, in config.py. Their parsed namespace holds only the options the user gave; ``train``
passes exactly those to :func:`resfit.train`, which is what lets ``--resume`` apply the ones a
resumed run may change and refuse the others.

Nothing heavy is imported at module level: ``resfit --help``, ``resfit train --help`` and an
argument error answer without importing torch. The commands' handlers are in
:mod:`resfit.apps.commands`; each imports what it runs.

A user's mistake (a :class:`resfit.core.errors.ResfitError`) ends in one line and exit status 2;
anything else is a bug in resfit and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .apps.benchmark.cli import add_bench_parser
from .apps.commands import (
    add_trust_arguments,
    cmd_augment_preview,
    cmd_demo,
    cmd_distill,
    cmd_eval,
    cmd_explain,
    cmd_export,
    cmd_gradient_flow,
    cmd_lr_find,
    cmd_models,
    cmd_predict,
    cmd_prepare,
    cmd_train,
    cmd_weights,
    config_from_args,
    given_options,
)
from .apps.serve import add_serve_parser
from .apps.tune.cli import add_tune_parser
from .core.config import (
    AUGMENT_FLAGS,
    EXPORT_FORMATS,
    OPTIONS,
    PARSERS,
    SECTIONS,
    OptionInfo,
    TrainConfig,
    flag,
)
from .core.errors import ResfitError

__all__ = [
    "add_config_options",
    "build_parser",
    "config_from_args",
    "given_options",
    "main",
    "program",
]

# -- the options generated from the config --------------------------------------------------------


def _option_help(info: OptionInfo) -> str:
    """The option's help with its default, unless the help already explains the default."""
    if info.type is bool:
        return info.help if not info.default else f"turn off: {info.help}"
    text = info.help
    if info.default is not None and "default" not in text:
        shown = str(info.default).replace("%", "%%")  # argparse %-formats the help
        text += f" (default: {shown})"
    return text


def _add_option(parser: argparse.ArgumentParser | Any, info: OptionInfo, **extra: Any) -> None:
    """One config option as an argument. ``default=SUPPRESS``: an option the user did not give
    stays out of the namespace, so the config's default (or a resumed run's value) holds."""
    if info.type is bool:
        # On by default: the flag turns it off (--no-report); off by default: it turns it on.
        name = ("--no-" if info.default else "--") + info.name.replace("_", "-")
        action = "store_false" if info.default else "store_true"
        parser.add_argument(name, dest=info.name, action=action, default=argparse.SUPPRESS,
                            help=_option_help(info))  # fmt: skip
        return
    if info.type not in (int, float, str, *PARSERS.values()):
        raise TypeError(f"option {info.name}: the CLI cannot parse {info.type!r}")
    kwargs: dict[str, Any] = dict(
        type=info.type, default=argparse.SUPPRESS, help=_option_help(info)
    )
    if info.choices is not None:
        kwargs["choices"] = info.choices
    if info.metavar is not None:
        kwargs["metavar"] = info.metavar
    parser.add_argument(flag(info.name), dest=info.name, **{**kwargs, **extra})


def _section_description(section: str) -> str:
    doc = type(getattr(TrainConfig(), section)).__doc__ or ""
    return doc.strip().splitlines()[0].replace("``", "")


def add_config_options(parser: argparse.ArgumentParser, *, data_optional: bool = False) -> None:
    """Every option of :data:`resfit.core.config.OPTIONS`, in one argument group per section.

    ``data`` is positional (optional with ``data_optional``, for ``--resume``) and ``--out``
    is required; the rest are flags.
    """
    for section in SECTIONS:
        group = parser.add_argument_group(f"{section} options", _section_description(section))
        for info in OPTIONS.values():
            if info.section != section or not info.cli:
                continue
            if info.name == "data":
                group.add_argument("data", nargs="?" if data_optional else None, metavar="DATA",
                                   default=argparse.SUPPRESS, help=info.help)  # fmt: skip
            elif info.name == "out":
                _add_option(group, info, required=True, help=info.help)
            else:
                _add_option(group, info)


# -- the parser -----------------------------------------------------------------------------------


class _PredictHelp(argparse.HelpFormatter):
    """Lists the inference engines installed here in ``predict --help``; the registry imports
    torch, so it is read only when that help is shown."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        if action.dest == "engine" and text:
            from .inference.engines import available_engines

            text += f" (installed here: {', '.join(available_engines())})"
        return text


def _add_threads(p: argparse.ArgumentParser) -> None:
    """``--threads`` after a command that runs a model, as well as before it."""
    _add_option(p, OPTIONS["threads"])


def _add_training_commands(sub: Any) -> None:
    p = sub.add_parser("train", help="train a classifier on an image folder",
                       description="Train a classifier on an image folder and write a run folder.")  # fmt: skip
    add_config_options(p, data_optional=True)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint; DATA may be left out, and "
        "of the options given only those that may change mid-run are applied (--epochs, "
        "--early-stopping, --progress ...): any other one is refused",
    )
    p.set_defaults(func=cmd_train)

    _add_distill(sub)

    p = sub.add_parser(
        "prepare", help="write shards once (pre-resized JPEGs, labels, hashes) for resfit train",
        description="Write DATA's splits as LitData shards with a resfit index; resfit train "
        "SHARDS then streams them. Run again on the same --out to continue a killed run.",
    )  # fmt: skip
    p.add_argument("data", help="image folder or CSV manifest, as resfit train reads it")
    p.add_argument("--out", required=True, help="the shard folder to write")
    for name in (
        "img_size",
        "val_fraction",
        "test_fraction",
        "seed",
        "task",
        "progress",
        "window",
        "group_by",
    ):
        _add_option(p, OPTIONS[name])
    p.add_argument("--workers", dest="writers", type=int, default=None,
                   help="writer processes (default: one per core)")  # fmt: skip
    p.add_argument("--quality", type=int, default=93, help="JPEG quality (default: %(default)d)")
    p.add_argument("--frames-per-second", type=float, default=None, metavar="N",
                   help="DATA is a folder of labelled videos (DATA/<class>/*.mp4): extract N frames "
                        "a second into OUT.frames/ and prepare those (a video's frames stay in one split)")  # fmt: skip
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser(
        "lr-find", help="sweep the learning rate, plot loss against it and suggest one"
    )
    add_config_options(p)
    sweep = p.add_argument_group("sweep options")
    sweep.add_argument("--start-lr", type=float, default=1e-7, help="(default: %(default)g)")
    sweep.add_argument("--end-lr", type=float, default=10.0, help="(default: %(default)g)")
    sweep.add_argument("--steps", type=int, default=100, help="batches in the sweep (default: %(default)d)")  # fmt: skip
    p.set_defaults(func=cmd_lr_find)


def _add_distill(sub: Any) -> None:
    p = sub.add_parser(
        "distill", help="distil a run into a smaller network (knowledge distillation)",
        description="Train --student on DATA to match TEACHER_RUN's outputs on the same augmented "
        "images (MixUp/CutMix on unless --mixup/--cutmix say otherwise); writes an ordinary run "
        "folder. The other options are train's.",
    )  # fmt: skip
    p.add_argument("teacher", metavar="TEACHER_RUN", help="a finished run folder (the teacher)")
    p.add_argument("--student", dest="arch", required=True, metavar="ARCH",
                   help="the student's architecture (resnet20_cifar, resnet18 ...; resfit models)")  # fmt: skip
    add_config_options(p)
    p.set_defaults(func=cmd_distill)


def _add_run_commands(sub: Any) -> None:
    """The commands that use a finished run: eval, predict, export, explain."""
    _add_eval(sub)
    _add_predict(sub)
    _add_export(sub)
    _add_explain(sub)


def _add_eval(sub: Any) -> None:
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
    p.add_argument("--engine", default="auto", metavar="ENGINE",
                   help="as for predict: auto (the default), torch, openvino, onnx or tensorrt")  # fmt: skip
    p.add_argument("--slice-by", metavar="COLUMN",
                   help="figures per group of this manifest column or DICOM tag (e.g. Manufacturer)")  # fmt: skip
    _add_threads(p)
    p.set_defaults(func=cmd_eval)


def _add_predict(sub: Any) -> None:
    p = sub.add_parser(
        "predict", help="predict new images with a run", formatter_class=_PredictHelp
    )
    p.add_argument("run")
    p.add_argument("inputs", nargs="+", help="files, folders (recursive) or globs")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--out", help="CSV file to write (default: print)")
    p.add_argument(
        "--fps",
        type=float,
        default=None,
        help="video inputs: frames classified per second (default: every frame)",
    )
    p.add_argument(
        "--smooth",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="video inputs: the smoothing window of the events (default: %(default)g s)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument(
        "--tta", action="store_true", help="test-time augmentation: average with the mirrored image"
    )
    # No choice list: the engine registry checks the name, and for an engine whose package is
    # missing it says what to install (argparse would only say "invalid choice").
    p.add_argument("--engine", default="auto", metavar="ENGINE",
                   help="auto (the default: the fastest installed engine here, named in the log), "
                        "torch, openvino, onnx (RUN/export/model.onnx; int8 with --precision int8), "
                        "or tensorrt (NVIDIA GPUs: fp16, fp32, int8)")  # fmt: skip
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the model (pays off on large folders)"
    )
    add_trust_arguments(p)
    _add_threads(p)
    p.set_defaults(func=cmd_predict)


def _add_export(sub: Any) -> None:
    p = sub.add_parser("export", help="export a run to ONNX, OpenVINO or Triton, optionally int8")
    p.add_argument("run")
    p.add_argument("--format", default="onnx", choices=EXPORT_FORMATS,
                   help="onnx (RUN/export/model.onnx), openvino (RUN/export/openvino/), or "
                        "triton (a Triton model repository around the ONNX model)")  # fmt: skip
    p.add_argument("--name", help="triton: the model's name (default: the run folder's)")
    p.add_argument("--max-batch", type=int, default=32, help="triton: dynamic batching limit")
    p.add_argument("--max-queue-delay-us", type=int, default=5000,
                   help="triton: longest wait to fill a batch, in microseconds")  # fmt: skip
    p.add_argument("--int8", action="store_true", help="static int8 quantization (needs --calib)")
    p.add_argument(
        "--calib", help="images to calibrate int8 on (a folder; a few hundred are enough)"
    )
    p.add_argument(
        "--val", help="labelled images to measure the accuracy change on (default: the run's data)"
    )
    p.add_argument("--out", help="folder (default RUN/export)")
    _add_threads(p)
    p.set_defaults(func=cmd_export)


def _add_explain(sub: Any) -> None:
    p = sub.add_parser("explain", help="Grad-CAM overlays (PNG) of what the model looked at")
    p.add_argument("run")
    p.add_argument("inputs", nargs="+", help="files, folders or globs")
    p.add_argument("--out", default="explain", help="folder for the PNG files")
    p.add_argument(
        "--class", dest="class_name", help="explain this class (default: the prediction)"
    )
    _add_threads(p)
    p.set_defaults(func=cmd_explain)


def _add_gradient_flow(sub: Any) -> None:
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
    _add_threads(p)
    p.set_defaults(func=cmd_gradient_flow)


def _add_augment_preview(sub: Any) -> None:
    p = sub.add_parser("augment-preview", help="write a PNG grid of augmented samples")
    p.add_argument("data")
    p.add_argument("--out", default="augment-preview.png")
    for name in ("augment", *AUGMENT_FLAGS):
        _add_option(p, OPTIONS[name])
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--rows", type=int, default=6)
    p.add_argument("--views", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    _add_threads(p)
    p.set_defaults(func=cmd_augment_preview)


def _add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="the main job, offline: train, transfer and compare on real digits"
    )
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="fewer epochs (for the tests)")
    p.add_argument("--seed", type=int, default=0, help="which few images, and every run's seed")
    _add_threads(p)
    p.set_defaults(func=cmd_demo)


def _add_tool_commands(sub: Any) -> None:
    """gradient-flow, augment-preview, bench and demo; serve, embed, similar, tune, audit."""
    _add_gradient_flow(sub)
    _add_augment_preview(sub)
    add_bench_parser(sub, _add_threads)
    _add_demo(sub)
    add_serve_parser(sub)
    _add_embed_parsers(sub)
    add_tune_parser(sub, add_config_options)
    from .apps.audit import add_audit_parser

    add_audit_parser(sub)


def _lazy(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    """A command whose module is imported only when it runs (``--help`` stays fast)."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(f"resfit.{module}"), function)(args)

    return run


def _add_embed_parsers(subparsers: Any) -> None:
    """``embed`` and ``similar`` (resfit.inference.embed, and its numpy, load when they run)."""
    p = subparsers.add_parser(
        "embed", help="write image embeddings (L2-normalised pooled features) to an npz"
    )
    p.add_argument("inputs", nargs="+", metavar="RUN|INPUT",
                   help="RUN then images, folders or globs; or only inputs with --arch/--weights")  # fmt: skip
    p.add_argument("--arch", help="an architecture (`resfit models`), instead of a RUN")
    p.add_argument("--weights", help="registered weights name or file, with --arch")
    p.add_argument("--out", required=True, help="the .npz file to write")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--no-flip", action="store_true",
                   help="do not sum each image's features with its mirror's (2x faster, not mirror-invariant)")  # fmt: skip
    p.set_defaults(func=_lazy("inference.embed", "cmd_embed"))

    p = subparsers.add_parser(
        "similar", help="nearest neighbours in an embeddings npz (CSV to stdout)"
    )
    p.add_argument("npz", help="written by `resfit embed`")
    p.add_argument("queries", nargs="+", metavar="QUERY",
                   help="image files, folders or globs (embedded with the npz's model), or row numbers in the npz")  # fmt: skip
    p.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.set_defaults(func=_lazy("inference.embed", "cmd_similar"))


def build_parser() -> argparse.ArgumentParser:
    """The ``resfit`` parser. Builds without importing torch."""
    parser = argparse.ArgumentParser(
        prog="resfit", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    _add_option(parser, OPTIONS["threads"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the architectures")
    p.add_argument("--no-plain", dest="plain", action="store_false", help="hide plain twins")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("weights", help="list the registered pretrained weights")
    p.add_argument("--arch", help="only the weights for this architecture")
    p.set_defaults(func=cmd_weights)

    _add_training_commands(sub)
    _add_run_commands(sub)
    _add_tool_commands(sub)
    return parser


def _setup_logging(verbose: bool) -> None:
    rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 reports progress
    # Other libraries at WARNING unless --verbose: the ONNX exporter logs every graph pass.
    root = logging.DEBUG if verbose else logging.WARNING
    logging.basicConfig(level=root, format="%(message)s", stream=sys.stderr)
    logging.getLogger("resfit").setLevel(root if verbose or not rank0 else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Run ``resfit ARGV``; returns the exit status (2: a user error, told in one line)."""
    return _run(argv)[0]


def _run(argv: list[str] | None) -> tuple[int, str]:
    """The exit status and the command that ran."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args), args.command
    except ResfitError as e:
        # The user's mistake: one line that says what to change. Any other exception is a
        # bug in resfit and keeps its traceback.
        print(f"resfit {args.command}: error: {e}", file=sys.stderr)
        return 2, args.command
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130, args.command


# Commands whose process ends without Python's module teardown: after predict it took 0.6-0.7 s
# of a 4-5 s run (torch, OpenVINO and their extensions freeing what the OS frees anyway),
# measured on the 2-core AMX Xeon. Their files are closed by then (written in `with` blocks).
_EXIT_AT_ONCE = frozenset({"predict"})


def program() -> None:
    """The ``resfit`` program (``python -m resfit``, the console script): :func:`main`, then
    for the commands in ``_EXIT_AT_ONCE`` an exit that flushes the output and skips teardown.
    :func:`main` itself returns, for callers in Python."""
    code, command = _run(None)
    if command in _EXIT_AT_ONCE:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing left to deliver
                pass
        logging.shutdown()  # flushes and closes log handlers (a --log file, say)
        os._exit(code)
    sys.exit(code)
