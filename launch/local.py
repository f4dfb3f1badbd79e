"""Run one `bignlp-jax` command as N processes on this machine, joined by jax.distributed.

    python launch/local.py --processes 2 --devices-per-process 2 -- train tiny train.steps=10

Each process gets D simulated CPU devices and the coordinator on loopback, so multi-host code
paths (process-local batches, cross-process collectives over gloo, checkpoints written by several
processes) run on one machine. Output lines are prefixed with `[pI]`. If one process fails, the
launcher says which one first, in one line (`process 1 (pid N) was killed by signal 9 (SIGKILL);
stopping the other 1 process(es)`), stops the others (SIGTERM, then SIGKILL after --grace
seconds) and exits with the failed process's code: its exit status, or 128 + the signal number
for a process killed by a signal (as a shell reports it: 137 for SIGKILL).
JAX's coordination service runs in the launcher's own helper (`bignlp-jax coordinator`), not in
process 0, so that the loss of any worker, process 0 included, is named by the others in one
line (`--coordination-service process0` leaves it to process 0, as on SLURM).
SIGTERM/SIGINT to the launcher are forwarded (SIGHUP, a closed terminal, as SIGTERM), so a run
can be preempted like a cluster job (it then exits with the requeue code 75 once every process
has saved). Workers die with the launcher even when it is SIGKILLed (their
parent-death signal), so none is ever left behind.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `launch` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bignlp_jax.parallel.coordination_host import ServiceHelper, start_service  # noqa: E402
from launch.common import LaunchError, bignlp_jax_command, main_wrapper  # noqa: E402

# exit code with which bignlp-jax asks to be run again (checkpoint saved); see bignlp_jax.errors
REQUEUE_EXIT_CODE = 75


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: dict[str, str], index: int, count: int, devices: int,
                port: int, external_service: bool = False) -> dict[str, str]:
    """Environment of process `index`: simulated CPU devices and the explicit job layout."""
    env = dict(base)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags.strip()} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    env["BIGNLP_COORDINATOR"] = f"127.0.0.1:{port}"
    env["BIGNLP_NUM_PROCESSES"] = str(count)
    env["BIGNLP_PROCESS_ID"] = str(index)
    if external_service:
        env["BIGNLP_COORDINATION_SERVICE"] = "external"
    return env


def start_coordination_service(cmd: list[str], processes: int, port: int,
                               worker_args: list[str]) -> ServiceHelper:
    """`bignlp-jax coordinator` on 127.0.0.1:port, with the workers' own heartbeat and shutdown
    timeouts (top-level options of their command line); returns once it listens."""
    parser = argparse.ArgumentParser(add_help=False)
    for flag in ("--heartbeat-timeout", "--shutdown-timeout"):
        parser.add_argument(flag, type=float)
    known, _ = parser.parse_known_args(worker_args)
    timeouts = [f"--{name.replace('_', '-')}={value:g}" for name, value in vars(known).items()
                if value is not None]
    service_cmd = [*cmd, "coordinator", "--bind", "127.0.0.1", "--port", str(port),
                   "--processes", str(processes), "--until", "stdin", *timeouts]
    env = {**os.environ, "BIGNLP_DISTRIBUTED": "off", "JAX_PLATFORMS": "cpu"}
    try:
        # it dies with the launcher, as the workers do: nobody is left to serve
        service = start_service(service_cmd, f"127.0.0.1:{port}", env,
                                what="the launcher's coordination service",
                                preexec_fn=_die_with_parent_fn())
    except RuntimeError as e:
        raise LaunchError(f"could not start the coordination service on 127.0.0.1:{port}: {e}"
                          "\n  fix: choose a free --port, or pass --coordination-service "
                          "process0") from None
    print(f"local.py: coordination service (pid {service.pid}) on 127.0.0.1:{port}",
          flush=True)
    return service


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


def _stream(proc: subprocess.Popen, prefix: bytes, lock: threading.Lock) -> None:
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


def _die_with_parent_fn():
    """A `preexec_fn`: in the child, before exec, ask the kernel for SIGKILL when the launcher
    dies (even by SIGKILL, which it cannot forward), so workers are never left behind stalled
    in a collective. Survives exec; Linux only (elsewhere the forwarding below still applies).
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


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
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


def launch(args_: list[str], processes: int, devices: int, port: int | None = None,
           grace: float = 3.0, executable: str | None = None,
           coordination_service: str = "launcher") -> int:
    """Start the processes, stream their output, and return the job's exit code."""
    if processes < 1 or devices < 1:
        raise LaunchError("--processes and --devices-per-process must be at least 1")
    if not args_:
        raise LaunchError("no bignlp-jax arguments given; put them after `--`, e.g. "
                          "`-- train tiny train.steps=10`")
    port = port or free_port()
    prefix = bignlp_jax_command(executable)
    cmd = [*prefix, *args_]
    external = coordination_service == "launcher" and processes > 1
    service = start_coordination_service(prefix, processes, port, args_) if external else None
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    stop_requested = threading.Event()

    def forward(signum, frame):  # preemption drill: every process saves and exits with 75
        stop_requested.set()
        # SIGHUP (the terminal closed) becomes SIGTERM: the workers save and stop
        sent = signal.SIGTERM if signum == signal.SIGHUP else signum
        for p in procs:
            _signal_group(p, sent)

    previous = {s: signal.signal(s, forward)
                for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    readers = []
    die_with_parent = _die_with_parent_fn()
    try:
        for i in range(processes):
            env = process_env(dict(os.environ), i, processes, devices, port, external)
            p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 start_new_session=True,
                                 # between fork and exec: only prctl() and getppid()
                                 preexec_fn=die_with_parent)  # noqa: PLW1509
            procs.append(p)
            print(f"local.py: process {i} (pid {p.pid}): {' '.join(cmd)}", flush=True)
            t = threading.Thread(target=_stream, args=(p, f"[p{i}] ".encode(), lock), daemon=True)
            t.start()
            readers.append(t)
        code = _supervise(procs, grace, stop_requested)
    finally:
        for p in procs:  # never leave children behind, whatever happened above
            if p.poll() is None:
                _signal_group(p, signal.SIGKILL)
                p.wait()
        for t in readers:
            t.join(timeout=5)
        for s, handler in previous.items():
            signal.signal(s, handler)
        if service is not None:
            service.shutdown()  # every worker has ended
    return code


def _supervise(procs: list[subprocess.Popen], grace: float, stop_requested: threading.Event) -> int:
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
                _signal_group(p, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while any(p.poll() is None for p in running) and time.monotonic() < deadline:
                time.sleep(0.05)
            for p in running:
                if p.poll() is None:
                    _signal_group(p, signal.SIGKILL)
                p.wait()
            return _exit_code(c)
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        split = argv.index("--")
        own, rest = argv[:split], argv[split + 1:]
    else:
        own, rest = argv, []
    parser = argparse.ArgumentParser(
        prog="local.py", description=__doc__.splitlines()[0],
        usage="%(prog)s --processes N --devices-per-process D [--port P] -- BIGNLP-JAX-ARGS...")
    parser.add_argument("--processes", type=int, required=True, help="processes to start")
    parser.add_argument("--devices-per-process", type=int, default=1,
                        help="simulated CPU devices in each process")
    parser.add_argument("--port", type=int, default=None,
                        help="coordinator port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--grace", type=float, default=3.0,
                        help="seconds between SIGTERM and SIGKILL when stopping the others")
    parser.add_argument("--bignlp-jax", dest="executable", default=None,
                        help="bignlp-jax executable (default: the one next to this Python)")
    parser.add_argument("--coordination-service", choices=("launcher", "process0"),
                        default="launcher",
                        help="who hosts JAX's coordination service: this launcher (default; "
                             "losing process 0 is then like losing any other) or process 0")
    opts = parser.parse_args(own)
    return main_wrapper(lambda: launch(rest, opts.processes, opts.devices_per_process,
                                       opts.port, opts.grace, opts.executable,
                                       opts.coordination_service))


if __name__ == "__main__":
    sys.exit(main())
