"""Dying with the parent (worker and helper processes): a child the kernel signals when its parent goes, so that a
SIGKILLed router leaves no worker behind and a SIGKILLed worker no graph-export helper."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: signal.Signals, parent: int | None = None) -> None:
    """Ask the kernel for `sig` when the parent exits (Linux only). With `parent`, the pid the parent had: if it is
    already gone (the child was reparented before it asked), exit now, by the same signal."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)
