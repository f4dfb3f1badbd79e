"""Notice a vanished peer before JAX does, and leave with one message instead of a C++ abort.

When a process of a job dies (SIGKILL, OOM killer, a lost host), JAX's coordination service
notices after the heartbeat timeout and every survivor then aborts with a C++ fatal error and a
stack dump (jax 0.10's `missed_heartbeat_callback` cannot be used from Python: the status it
passes has no Python type). So each process runs this watchdog: every second it bumps its own
counter in the coordination service's key-value store and reads everyone's. A counter that has
not moved for `stale_after` seconds (well inside the heartbeat timeout) names the lost process.
The store lives in a helper process (coordination_host.py), so it outlives process 0; an
unreachable store means that helper (with process 0's host) is gone. The survivor prints one
line and exits with LOST_PEER_EXIT_CODE. A process that exits through Python marks itself
`exited` on the way out (atexit); peers that outlive it by `stale_after` (a finished job's
processes end within seconds of each other) say so and stop too, instead of hanging in a
collective.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import time

# "the job failed": not a user error (2) and not a clean requeue (75)
LOST_PEER_EXIT_CODE = 1
KEY_PREFIX = "bignlp_alive/"
EXITED = "exited"
INTERVAL = 1.0


def lost_peer_message(command: str, lost: int, count: int, me: int, silent: float,
                      exited: bool = False) -> str:
    who = f"process {lost} of {count}" + (" (the coordinator)" if lost == 0 else "")
    how = (f"it exited {silent:.0f} s ago while this one still runs" if exited else
           f"no sign of life for {silent:.0f} s (it was killed, crashed, or its host went down)")
    return (f"{command}: error: lost {who}: {how}; stopping process {me} too "
            f"(exit {LOST_PEER_EXIT_CODE}). Its own log says why it stopped; run the job again "
            "to resume from the last checkpoint")


def exiting() -> bool:
    """True once the interpreter is shutting down (the main thread has finished)."""
    return not threading.main_thread().is_alive()


class PeerWatchdog:
    """A daemon thread; `client` is JAX's DistributedRuntimeClient (or a stand-in with
    `key_value_set` and `key_value_dir_get`)."""

    def __init__(self, client, process_id: int, count: int, stale_after: float,
                 command: str = "bignlp-jax", exit_fn=os._exit):
        self.client, self.me, self.count = client, process_id, count
        self.stale_after, self.command, self.exit_fn = stale_after, command, exit_fn
        self.thread = threading.Thread(target=self._run, name="bignlp-peer-watchdog",
                                       daemon=True)

    def start(self) -> PeerWatchdog:
        self.thread.start()
        atexit.register(self.mark_exited)
        return self

    def mark_exited(self) -> None:
        """Tell the peers this process is leaving on purpose (runs at interpreter exit)."""
        with contextlib.suppress(Exception):  # the coordinator may be gone already
            self.client.key_value_set(f"{KEY_PREFIX}{self.me}", EXITED, allow_overwrite=True)

    def _lost(self, process: int, silent: float, exited: bool = False) -> None:
        print(lost_peer_message(self.command, process, self.count, self.me, silent, exited),
              file=sys.stderr, flush=True)
        self.exit_fn(LOST_PEER_EXIT_CODE)

    def _run(self) -> None:
        started = last_ok = time.monotonic()
        seen: dict[int, tuple[str, float]] = {}  # process -> (counter, when it last moved)
        beat = 0
        while True:
            now = time.monotonic()
            beat += 1
            try:
                if not exiting():
                    self.client.key_value_set(f"{KEY_PREFIX}{self.me}", str(beat),
                                              allow_overwrite=True)
                values = dict(self.client.key_value_dir_get(KEY_PREFIX))
                last_ok = now
            except Exception:  # noqa: BLE001 - any failure to reach the store: process 0 gone?
                if now - last_ok > self.stale_after:
                    return self._lost(0, now - last_ok)
                time.sleep(INTERVAL)
                continue
            for process in range(self.count):
                if process == self.me:
                    continue
                value = values.get(f"{KEY_PREFIX}{process}")
                if value is None:  # not started its watchdog yet: count from our start
                    value, moved = "", seen.get(process, ("", started))[1]
                elif seen.get(process, (None,))[0] != value:
                    moved = now
                else:
                    moved = seen[process][1]
                seen[process] = (value, moved)
                if now - moved > self.stale_after:
                    return self._lost(process, now - moved, exited=value == EXITED)
            time.sleep(INTERVAL)
