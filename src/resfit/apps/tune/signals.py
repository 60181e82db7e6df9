"""Signals in ``resfit tune``: Ctrl-C must never cut a journal write in half.

A journal append torn by KeyboardInterrupt would leave a broken record in a study that other
processes share, so writes hold SIGINT back (:func:`no_interrupt`), and the main process of
``--jobs`` forwards one SIGINT to its workers and waits for them (:func:`stop_workers`).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Iterator


@contextlib.contextmanager
def no_interrupt() -> Iterator[None]:
    """Hold SIGINT back while a journal write is under way (it arrives once the block ends):
    Ctrl-C in the middle of an append would leave a torn record in the shared journal."""
    import threading

    if (
        not hasattr(signal, "pthread_sigmask")
        or threading.current_thread() is not threading.main_thread()
    ):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def stop_workers(procs: list[subprocess.Popen]) -> None:
    """Ctrl-C: one SIGINT to each worker, which requeues its trial and exits; a second Ctrl-C
    here terminates them."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    try:
        for p in procs:
            p.wait()
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise
