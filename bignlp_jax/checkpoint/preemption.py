"""Stop requests: SIGTERM/SIGINT (what SLURM, Kubernetes and TPU maintenance send before a kill)
and `train.max_time`. The loop finishes its step, saves, waits until the save is durable and
exits with REQUEUE_EXIT_CODE.

With several processes, all of them must stop after the same step (a checkpoint needs every
process), even when only one got the signal or one's clock ran out first. After every step each
process shares its flag with one tiny all-gather, and JAX's preemption sync point (set up by
`jax.distributed`) is consulted too, so all agree on the same step without deadlocking.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from bignlp_jax.data.store import chunks as store_chunks

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Context manager: installs the signal handlers (main thread only) and answers
    `should_stop(step)` identically on every process. `max_time` counts from construction."""

    def __init__(self, max_time: float | None = None):
        self.max_time = max_time
        self.signal: int | None = None
        self.start = time.monotonic()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        # A token store verified while the run starts stops at once, not after hashing it all.
        store_chunks.set_stop_hook(self._signal_name)
        return self

    def _signal_name(self) -> str | None:
        return None if self.signal is None else signal.Signals(self.signal).name

    def __exit__(self, *exc) -> None:
        store_chunks.set_stop_hook(None)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None:
            if signum == signal.SIGINT:  # a second Ctrl-C: the user does not want to wait
                print(f"\n{name} again: aborting without waiting for the checkpoint",
                      file=sys.stderr, flush=True)
                os._exit(128 + signum)
            return
        self.signal = signum
        print(f"\n{name} received: finishing this step, then saving a checkpoint and exiting",
              file=sys.stderr, flush=True)

    def local_reason(self) -> str | None:
        if self.signal is not None:
            return signal.Signals(self.signal).name
        if self.max_time is not None and time.monotonic() - self.start > self.max_time:
            return f"train.max_time={self.max_time:g}s reached"
        return None

    def should_stop(self, step: int) -> str | None:
        """Why to stop after `step` (the same answer on every process), or None."""
        reason = self.local_reason()
        if jax.process_count() == 1:
            return reason
        flags = multihost_utils.process_allgather(np.array([reason is not None], np.int32))
        if reason is None and int(np.max(flags)):
            reason = "stop requested by another process"
        if reason is None and _preemption_sync_point(step):
            reason = "preemption notice from the JAX coordination service"
        return reason


def _preemption_sync_point(step: int) -> bool:
    try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
    except RuntimeError:  # preemption service not set up (single process, or disabled)
        return False
