"""The calling thread's alternate signal stack: checked, and mended when a library left it dangling.

Why this exists: OpenVINO's CPU plugin gives the thread that loads it a larger alternate signal
stack (``SigAltStackSetup``), freed with ``munmap`` when that ``ov.Core`` is destroyed. It puts the
previous stack back only if its own is still the current one, so two Cores destroyed in the
order they were made (not the reverse) leave the thread pointing at unmapped memory. The next
signal delivered on the alternate stack (every Python-level handler is installed with
``SA_ONSTACK``: SIGINT, the SIGCHLD handler of torch's DataLoader, faulthandler's) cannot be
delivered and the kernel kills the process with SIGSEGV, with faulthandler silent, long after
the cause. That was the suite's "native crash" in one process (``bench inference`` made two
engines; a later test's DataLoader workers exited). Reproduced in 15 lines with openvino 2026.4.

resfit shares one Core per process (:mod:`resfit.inference.openvino`), which keeps the order
LIFO; :func:`mend_signal_stack` is the net for Cores made by other libraries (NNCF makes its own).
Linux only: elsewhere every function is a no-op that reports a sound stack.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import sys

log = logging.getLogger(__name__)

SS_DISABLE = 2  # <signal.h>
STACK_BYTES = 64 * 1024  # ample for the largest xsave frame (AMX: 11 kB) plus a handler
_kept: list[ctypes.Array] = []  # stacks resfit installed: alive for the whole process


class _StackT(ctypes.Structure):
    _fields_ = [
        ("ss_sp", ctypes.c_void_p),
        ("ss_flags", ctypes.c_int),
        ("ss_size", ctypes.c_size_t),
    ]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, once (tests check the stack after every test); None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    return libc


def signal_stack() -> tuple[int, int] | None:
    """``(address, size)`` of the calling thread's alternate signal stack, or None when it has
    none (or off Linux)."""
    libc = _libc()
    if libc is None:
        return None
    current = _StackT()
    if libc.sigaltstack(None, ctypes.byref(current)) != 0:
        return None
    if current.ss_flags & SS_DISABLE or not current.ss_sp:
        return None
    return int(current.ss_sp), int(current.ss_size)


def _mapped(address: int, size: int) -> bool:
    """Whether every page of ``[address, address + size)`` is mapped: ``mincore`` fails with
    ENOMEM on any unmapped page, and reads no memory itself."""
    libc = _libc()
    assert libc is not None
    page = mmap.PAGESIZE
    start = address - address % page
    length = address + size - start
    pages = (length + page - 1) // page
    vector = ctypes.create_string_buffer(pages)
    return libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), vector) == 0


def signal_stack_is_sound() -> bool:
    """True when the calling thread has no alternate signal stack or one whose memory is mapped."""
    stack = signal_stack()
    return stack is None or _mapped(*stack)


def mend_signal_stack() -> bool:
    """Give the calling thread a resfit-owned alternate signal stack if its current one points at
    unmapped memory. Returns True when it had to (and logs it at debug level)."""
    if signal_stack_is_sound():
        return False
    libc = _libc()
    assert libc is not None
    memory = ctypes.create_string_buffer(STACK_BYTES)
    fresh = _StackT(ctypes.cast(memory, ctypes.c_void_p), 0, STACK_BYTES)
    if libc.sigaltstack(ctypes.byref(fresh), None) != 0:  # pragma: no cover - EPERM on-stack only
        raise OSError(ctypes.get_errno(), "sigaltstack failed while mending a dangling stack")
    _kept.append(memory)
    log.debug("the alternate signal stack pointed at unmapped memory (a library freed it): mended")
    return True
