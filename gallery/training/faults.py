"""Fault injection, to prove recovery works: a real kill, not a simulated one.

GALLERY_KILL_AFTER_EPOCH=N makes a training process SIGKILL itself right after epoch N's
checkpoint is written, unless the step is already a resume or retry (so recovery can succeed).
"""
from __future__ import annotations

import os
import signal

ENV = "GALLERY_KILL_AFTER_EPOCH"


def kill_after_epoch(recovering: bool):
    """An `on_epoch_end` hook for gallery.training.engine.fit, or None when no fault is asked for."""
    n = os.environ.get(ENV)
    if not n or recovering:
        return None

    def hook(epoch: int) -> None:
        if epoch + 1 == int(n):
            print(f"{ENV}={n}: killing this process after epoch {n}'s checkpoint", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    return hook
