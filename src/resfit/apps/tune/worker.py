"""A worker process of ``resfit tune --jobs K``: reads its plan (JSON) on stdin and runs
trials of the shared study until it has its total. Started by :func:`spawn_workers` (for
:mod:`resfit.apps.tune.study`)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from ...core import threads
from .signals import stop_workers
from .study import Plan, work

log = logging.getLogger("resfit")


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


def spawn_workers(plan: Plan, jobs: int) -> list[int]:
    """``jobs`` worker processes on this machine, each with its share of the cores; returns
    the exit codes of those that failed (a crash, a kill)."""
    from ...core import threads

    n = threads.child_threads(jobs, plan.fixed.get("threads"))
    env = threads.child_env(n)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[2]),
                                                      env.get("PYTHONPATH")]))  # fmt: skip
    log.info("resfit tune: %d trials at once, %d CPU thread(s) each", jobs, n)
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(jobs):
            # Their own process group: a terminal's Ctrl-C reaches this process only, which
            # forwards it once (twice would cut a worker's requeue write short).
            procs.append(subprocess.Popen([sys.executable, "-m", "resfit.apps.tune.worker"],
                                          stdin=subprocess.PIPE, env=env, text=True,
                                          process_group=0))  # fmt: skip
            procs[-1].stdin.write(plan.to_json())
            procs[-1].stdin.close()
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        stop_workers(procs)
        raise
    except BaseException:  # a worker that could not be started or fed: stop the others
        for p in procs:
            p.terminate()
        raise
    failed = [c for c in codes if c]
    if failed:
        log.error("resfit tune: %d worker(s) failed, exit codes %s (their trials are in "
                  "trials.csv)", len(failed), failed)  # fmt: skip
    return failed


if __name__ == "__main__":
    sys.exit(main())
