"""``resfit tune --jobs K``: the K worker processes (:mod:`resfit.apps.tune.worker`), each with
its share of the cores, fed the study's plan on stdin. Apart from :mod:`.study` (which calls
it) so that the worker module, which imports the study, is never imported back by it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from .signals import stop_workers

__all__ = ["spawn_workers"]

log = logging.getLogger("resfit")


def spawn_workers(plan: Any, jobs: int) -> list[int]:
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
