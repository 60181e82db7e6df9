"""``resfit tune DATA --trials N --out DIR [--timeout S] [--storage URL] [--jobs K] [train
options]``: the command over :func:`resfit.apps.tune.tune`.

Every ``resfit train`` option is accepted; the ones given are fixed in every trial and left out
of the search. Building the parser imports neither torch nor Optuna.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from ...core.config import OPTIONS

__all__ = ["add_tune_parser"]


def add_tune_parser(
    subparsers: Any, add_config_options: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add ``tune`` to ``resfit``'s subcommands. ``add_config_options`` is the CLI's own
    (:func:`resfit.cli.add_config_options`), passed in so that imports flow one way."""
    p = subparsers.add_parser(
        "tune",
        help="search hyperparameters with Optuna (TPE, median pruning); keeps the best run",
        description="Search learning rate, weight decay, label smoothing, augmentation, "
        "MixUp/CutMix, head epochs, freeze depth and EMA for training on DATA. Training "
        "options given here are fixed, not searched. Writes DIR/trials.csv, DIR/best/ (a run "
        "folder) and DIR/report.html; run it again to finish a stopped study.",
    )
    add_config_options(p)
    for action in p._actions:  # --out is the study's folder here, not one run's
        if action.dest == "out":
            action.help = "the study's folder (DIR): study, trials/, trials.csv, best/, report.html"
    t = p.add_argument_group("tune options")
    t.add_argument("--trials", type=int, required=True,
                   help="trials in the study in all (a study run again runs the missing ones)")  # fmt: skip
    t.add_argument("--timeout", type=float, default=None,
                   help="seconds after which no new trial starts (running ones finish)")  # fmt: skip
    t.add_argument("--storage", default=None,
                   help="an RDB URL (postgresql://..., mysql://..., sqlite:///...) or a journal "
                        "file that several processes or machines share (default: DIR/study.journal)")  # fmt: skip
    t.add_argument("--jobs", type=int, default=1,
                   help="trials at once on this machine, each a process with its share of the cores")  # fmt: skip
    t.add_argument("--max-retries", type=int, default=1,
                   help="times a trial whose process died (memory, a crash) runs again before "
                        "it is recorded as failed (default 1)")  # fmt: skip
    p.set_defaults(func=_cmd_tune)


def _cmd_tune(args: argparse.Namespace) -> int:
    from ...core.config import TrainConfig
    from .study import tune

    fixed = {k: v for k, v in vars(args).items() if k in OPTIONS}
    data, out = fixed.pop("data"), fixed.pop("out")
    TrainConfig.from_options(data=data, **fixed).check()  # bad values answer before torch loads
    if args.jobs == 1:  # trials run in this process: it takes its share of the cores
        from ...core import threads

        threads.configure(fixed.get("threads"))
    r = tune(data, args.trials, out, timeout=args.timeout, storage=args.storage, jobs=args.jobs,
             max_retries=args.max_retries, **fixed)  # fmt: skip
    c = r.counts

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.2f}%"

    print(f"best val accuracy {pct(r.best_value)} (defaults {pct(r.defaults_value)}); "
          f"{c['COMPLETE']} complete, {c['PRUNED']} pruned, {c['FAIL']} failed; {r.wall_s:.0f} s")  # fmt: skip
    if r.best_dir is not None:
        print(f"best run: {r.best_dir}  params: {r.best_params}")
    print(f"report: {r.out / 'report.html'}  trials: {r.out / 'trials.csv'}")
    if r.failed_workers:  # the study is as far as it got; the exit code says it was not clean
        print(f"resfit tune: {len(r.failed_workers)} worker process(es) crashed (exit codes "
              f"{r.failed_workers}); run the same command again to go on", file=sys.stderr)  # fmt: skip
        return 1
    return 0
