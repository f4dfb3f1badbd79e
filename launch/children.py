"""The launcher's child processes (launch/local.py): tied to its life, their output copied
line by line, signalled as a group, watched until the first failure, and described in one line
when they end.

Each child leads its own process group, so a signal reaches whatever it started too. When one
fails, the others get SIGTERM, then SIGKILL after a grace period, and the job's exit code is the
failed child's: its exit status, or 128 + the signal number for one killed by a signal. A child
that asks to be run again (75: a checkpoint saved) is not a failure: the others finish saving.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time

# exit code with which bignlp-jax asks to be run again (checkpoint saved); see bignlp_jax.errors
REQUEUE_EXIT_CODE = 75


# Gloo (the CPU collectives of a multi-process jax job) prints a note to stdout from C++ for
# every communicator it connects, with no log level to turn it off: 8 lines for 2 processes
# that say everything went as expected. The launcher cuts them out of each process's output;
# a whole note whose peer count is short of the expected count (a real connection problem),
# and any line with other text after a note, are kept.
_GLOO = b"[Gloo] Rank "
_GLOO_CONNECTED = re.compile(rb"\[Gloo\] Rank \d+ is connected to (\d+) peer ranks\. "
                             rb"Expected number of connected peer ranks is : (\d+)")
# the note's pieces: two threads' notes (one per communicator) reach the pipe interleaved
_GLOO_PIECES = re.compile(rb"\[Gloo\] Rank | is connected to | peer ranks\. "
                          rb"|Expected number of connected peer ranks is : |\d+")


class GlooNotes:
    """Cuts Gloo's all-connected notes out of one process's output, line by line."""

    def __init__(self) -> None:
        self.owed = 0  # notes begun on a cut line whose end (a count and a newline) is still due

    def __call__(self, line: bytes) -> bytes | None:
        """The line without its notes; None when nothing else was on it (a progress bar may
        share its line: stdout and stderr go down one pipe)."""
        body = line.rstrip(b"\r\n")
        if self.owed and body.strip().isdigit():  # the count that ends an interleaved note
            self.owed -= 1
            return None
        start = body.find(_GLOO)
        if start < 0:
            return line
        notes = body[start:]
        if (_GLOO_PIECES.sub(b"", notes).strip()
                or any(m.group(1) != m.group(2) for m in _GLOO_CONNECTED.finditer(notes))):
            return line
        self.owed += max(notes.count(_GLOO) - line.endswith(b"\n"), 0)
        head = body[:start]
        return head + line[len(body):] if head.strip() else None


def stream_output(proc: subprocess.Popen, prefix: bytes, lock: threading.Lock) -> None:
    """Copy a child's output to ours, one prefixed line at a time (`\\r` ends a line too, so
    progress bars do not pile up into one endless line), without Gloo's connection notes."""
    out = sys.stdout.buffer
    pending = b""
    without_gloo_notes = GlooNotes()
    stream = proc.stdout
    assert isinstance(stream, io.BufferedReader)  # started with stdout=PIPE, binary
    while chunk := stream.read1(65536):
        lines = re.split(rb"(?<=[\n\r])", pending + chunk)
        pending = lines.pop()
        with lock:
            for line in lines:
                kept = without_gloo_notes(line)
                if kept is not None:
                    out.write(prefix + kept.rstrip(b"\r\n") + b"\n")
            out.flush()
    if pending and (kept := without_gloo_notes(pending)) is not None:
        with lock:
            out.write(prefix + kept + b"\n")
            out.flush()


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent_fn():
    """A `preexec_fn`: in the child, before exec, ask the kernel for SIGKILL when the launcher
    dies (even by SIGKILL, which it cannot forward), so workers are never left behind stalled
    in a collective. Survives exec; Linux only (elsewhere local.py's signal forwarding still
    applies).
    libc is loaded here, in the parent: the child between fork and exec only makes syscalls."""
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os._exit(128 + signal.SIGKILL)

    return preexec


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # each child leads its own process group (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode  # killed by signal s -> 128+s


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def ended(index: int, proc: subprocess.Popen) -> str:
    """How process `index` ended, for the launcher's one line: its exit code, or the signal
    that killed it (Popen gives -s for a process killed by signal s)."""
    code = proc.returncode
    how = (f"was killed by signal {-code} ({_signal_name(-code)})" if code < 0
           else f"exited with code {code}")
    return f"process {index} (pid {proc.pid}) {how}"


def supervise(procs: list[subprocess.Popen], grace: float, stop_requested: threading.Event) -> int:
    """Wait for all processes; on the first failure stop the rest and return its code."""
    while True:
        codes = [p.poll() for p in procs]
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if all(c is not None for c in codes):
            if not failed:
                return 0
            i, c = failed[0]
            print(f"local.py: {ended(i, procs[i])}; job exit code {_exit_code(c)}", flush=True)
            return _exit_code(c)
        if failed and not stop_requested.is_set() and failed[0][1] != REQUEUE_EXIT_CODE:
            i, c = failed[0]
            running = [p for p in procs if p.poll() is None]
            print(f"local.py: {ended(i, procs[i])}; stopping the other {len(running)} "
                  f"process(es); job exit code {_exit_code(c)}", flush=True)
            for p in running:
                signal_group(p, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while any(p.poll() is None for p in running) and time.monotonic() < deadline:
                time.sleep(0.05)
            for p in running:
                if p.poll() is None:
                    signal_group(p, signal.SIGKILL)
                p.wait()
            return _exit_code(c)
        time.sleep(0.05)
