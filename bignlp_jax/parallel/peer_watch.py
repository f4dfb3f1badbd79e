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
collective. At exit the watchdog keeps watching through JAX's shutdown barrier (a peer lost
there is named too), then stops before the interpreter finalizes: Python ends a daemon thread
that is inside a C++ call at that moment by unwinding it, which aborts the process ("FATAL:
exception not rethrown").

A process that stops on an error of its own (a checkpoint write that failed on its disk only,
bad input that only it saw) announces it before leaving (`announce_failure`, called by the
CLI): the others print one line naming it and its reason within a second, and exit with its
exit code, instead of waiting in a collective or a checkpoint barrier for a peer that is gone.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
import threading
import time

# "the job failed": not a user error (2) and not a clean requeue (75)
LOST_PEER_EXIT_CODE = 1
KEY_PREFIX = "bignlp_alive/"
FAILED_PREFIX = "bignlp_failed/"
EXITED = "exited"
INTERVAL = 1.0
ACK_GRACE = 0.5  # seconds a peer of a failed process outlives it


def lost_peer_message(command: str, lost: int, count: int, me: int, silent: float,
                      exited: bool = False, zero_is_coordinator: bool = True) -> str:
    coordinator = lost == 0 and zero_is_coordinator  # not with an external service
    who = f"process {lost} of {count}" + (" (the coordinator)" if coordinator else "")
    how = (f"it exited {silent:.0f} s ago while this one still runs" if exited else
           f"no sign of life for {silent:.0f} s (it was killed, crashed, or its host went down)")
    return (f"{command}: error: lost {who}: {how}; stopping process {me} too "
            f"(exit {LOST_PEER_EXIT_CODE}). Its own log says why it stopped; run the job again "
            "to resume from the last checkpoint")


def say(text: str) -> None:
    """Print to stderr on a line of its own: training's progress bar, drawn on stderr without a
    newline, may be on screen (these messages come while it runs, unlike the CLI's)."""
    print(f"\n{text}", file=sys.stderr, flush=True)


def failed_peer_message(command: str, failed: int, count: int, me: int, reason: str,
                        exit_code: int) -> str:
    return (f"{command}: error: process {failed} of {count} stopped: {reason} (its message "
            f"says more); stopping process {me} too (exit {exit_code})")


def announce_failure(reason: str, exit_code: int) -> None:
    """This process is stopping on an error: tell the peers (if it is part of a job)."""
    if PeerWatchdog.current is not None:
        PeerWatchdog.current.announce_failure(reason, exit_code)


def stop_job(message: str, exit_code: int) -> None:
    """From any thread of a process in a job: print `message` as the CLI prints an error, tell
    the peers, and leave now (os._exit). Returns (doing nothing) outside a job."""
    dog = PeerWatchdog.current
    if dog is None:
        return
    say(f"{dog.command}: error: {message}")
    dog.announce_failure(message, exit_code)
    sys.stdout.flush()
    dog.exit_fn(exit_code)


# how a collective reports that a peer process went away mid-call (gloo over TCP on CPU)
CONNECTION_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
                   "Socket closed")


def lost_connection(error: BaseException) -> str | None:
    """The phrase, if `error` (or an error it was raised from) is a collective that failed
    because a peer process went away."""
    current: BaseException | None = error
    for _ in range(10):
        if current is None:
            return None
        phrase = next((p for p in CONNECTION_LOST if p in str(current)), None)
        if phrase:
            return phrase
        current = current.__cause__ or current.__context__
    return None


def wait_for_lost_peer(error: BaseException) -> bool:
    """In a job, after a collective failed because a peer went away (it fails at once, while
    the watchdog needs `stale_after` to tell which peer): say so in one line and wait for the
    watchdog's verdict, which names the peer and ends the process. False if this does not
    apply (then the error is a bug and keeps its traceback); True if no verdict came."""
    dog = PeerWatchdog.current
    phrase = lost_connection(error)
    if dog is None or phrase is None:
        return False
    say(f"{dog.command}: a collective failed because a peer process went away ({phrase}); "
        f"naming it within {dog.stale_after:.0f} s")
    deadline = time.monotonic() + dog.stale_after + 3 * INTERVAL
    while dog.thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    return True


def exiting() -> bool:
    """True once the interpreter is shutting down (the main thread has finished)."""
    return not threading.main_thread().is_alive()


class PeerWatchdog:
    """A daemon thread; `client` is JAX's DistributedRuntimeClient (or a stand-in with
    `key_value_set` and `key_value_dir_get`)."""

    current: PeerWatchdog | None = None  # this process's, once started

    def __init__(self, client, process_id: int, count: int, stale_after: float,
                 command: str = "bignlp-jax", exit_fn=os._exit,
                 zero_is_coordinator: bool = True, shutdown_fn=None):
        self.client, self.me, self.count = client, process_id, count
        self.zero_is_coordinator = zero_is_coordinator
        self.stale_after, self.command, self.exit_fn = stale_after, command, exit_fn
        self.failed = False  # this process announced a failure of its own
        self.shutdown_fn = shutdown_fn  # JAX's distributed shutdown (its barrier), run at exit
        self.closing = False  # leaving: no more beats (peers must read `exited`)
        self.beat_lock = threading.Lock()  # a beat never lands after `exited`
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="bignlp-peer-watchdog",
                                       daemon=True)

    def start(self) -> PeerWatchdog:
        self.thread.start()
        atexit.register(self.close)
        PeerWatchdog.current = self
        return self

    def announce_failure(self, reason: str, exit_code: int, wait: float = 3.0) -> None:
        """Publish this process's error; then wait (at most `wait` s) until the others have
        read it and left, so that they stop with this reason rather than by losing their
        connections to this process first."""
        self.failed = True
        record = json.dumps({"reason": reason.splitlines()[0] if reason else "",
                             "exit_code": exit_code})
        try:
            self.client.key_value_set(f"{FAILED_PREFIX}{self.me}", record, allow_overwrite=True)
        except Exception:  # noqa: BLE001 - the coordinator is gone: nobody left to tell
            return
        others = [p for p in range(self.count) if p != self.me]
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                alive = dict(self.client.key_value_dir_get(KEY_PREFIX))
                failed = dict(self.client.key_value_dir_get(FAILED_PREFIX))
                # gone, or stopping on an error of its own (the same bad input, say)
                if all(alive.get(f"{KEY_PREFIX}{p}") == EXITED or f"{FAILED_PREFIX}{p}" in failed
                       for p in others):
                    return
            time.sleep(0.1)

    def close(self, join_timeout: float = 10.0) -> None:
        """At exit: say this process is leaving, pass JAX's shutdown barrier while still
        watching, then stop the thread (it must not be inside a C++ call at finalization)."""
        with self.beat_lock:
            self.closing = True
        self.mark_exited()
        try:
            if self.shutdown_fn is not None:
                self.shutdown_fn()
        finally:
            self.stopped.set()
            self.thread.join(join_timeout)

    def mark_exited(self) -> None:
        """Tell the peers this process is leaving on purpose (runs at interpreter exit)."""
        with contextlib.suppress(Exception):  # the coordinator may be gone already
            self.client.key_value_set(f"{KEY_PREFIX}{self.me}", EXITED, allow_overwrite=True)

    def _peer_failed(self, process: int, record: str) -> None:
        try:
            info = json.loads(record)
            reason, code = str(info["reason"]), int(info["exit_code"])
        except (ValueError, KeyError, TypeError):
            reason, code = "an error", LOST_PEER_EXIT_CODE
        say(failed_peer_message(self.command, process, self.count, self.me, reason, code))
        self.mark_exited()  # the failed process waits for this before it leaves
        # ... and leaves first: a launcher watching both then names it as the one that failed
        time.sleep(ACK_GRACE)
        self.exit_fn(code)

    def _lost(self, process: int, silent: float, exited: bool = False) -> None:
        say(lost_peer_message(self.command, process, self.count, self.me, silent, exited,
                              self.zero_is_coordinator))
        self.exit_fn(LOST_PEER_EXIT_CODE)

    def _run(self) -> None:
        started = last_ok = time.monotonic()
        seen: dict[int, tuple[str, float]] = {}  # process -> (counter, when it last moved)
        beat = 0
        while not self.stopped.is_set():
            now = time.monotonic()
            beat += 1
            try:
                with self.beat_lock:
                    if not (self.closing or exiting()):
                        self.client.key_value_set(f"{KEY_PREFIX}{self.me}", str(beat),
                                                  allow_overwrite=True)
                values = dict(self.client.key_value_dir_get(KEY_PREFIX))
                failures = dict(self.client.key_value_dir_get(FAILED_PREFIX))
                last_ok = now
            except Exception:  # noqa: BLE001 - any failure to reach the store: process 0 gone?
                if now - last_ok > self.stale_after:
                    return self._lost(0, now - last_ok)
                self.stopped.wait(INTERVAL)
                continue
            if self.failed:  # this process is stopping on its own error: nothing to add
                self.stopped.wait(INTERVAL)
                continue
            for key, record in sorted(failures.items()):
                process = int(key.rsplit("/", 1)[-1])
                if process != self.me:
                    return self._peer_failed(process, record)
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
            self.stopped.wait(INTERVAL)
