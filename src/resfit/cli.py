"""The `resfit` command: a thin layer over the Python API. Every command maps to one call."""

from __future__ import annotations

import argparse
import logging
import sys

from . import models, weights


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, weights.WeightsError) as e:
        # Bad input ends in one clear line, not a traceback.
        print(f"resfit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
