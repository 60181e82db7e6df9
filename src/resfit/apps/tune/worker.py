"""A worker process of ``resfit tune --jobs K``: reads its plan (JSON) on stdin and runs
trials of the shared study until it has its total. Started by
:func:`resfit.apps.tune.spawn.spawn_workers`."""

from __future__ import annotations

import logging
import sys

from ...core import threads
from .study import Plan, work


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("resfit").setLevel(logging.INFO)  # as the CLI: trials and epochs
    plan = Plan.from_json(sys.stdin.read())
    threads.configure(plan.fixed.get("threads"))  # the parent set RESFIT_THREADS to our share
    try:
        work(plan)
    except KeyboardInterrupt:  # forwarded by the parent: the trial was requeued
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
