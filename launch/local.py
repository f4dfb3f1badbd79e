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
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `launch` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bignlp_jax.parallel.coordination_host import ServiceHelper, start_service  # noqa: E402
from launch.children import (  # noqa: E402
    die_with_parent_fn,
    signal_group,
    stream_output,
    supervise,
)
from launch.common import LaunchError, bignlp_jax_command, main_wrapper  # noqa: E402


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
                                preexec_fn=die_with_parent_fn())
    except RuntimeError as e:
        raise LaunchError(f"could not start the coordination service on 127.0.0.1:{port}: {e}"
                          "\n  fix: choose a free --port, or pass --coordination-service "
                          "process0") from None
    print(f"local.py: coordination service (pid {service.pid}) on 127.0.0.1:{port}",
          flush=True)
    return service


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
            signal_group(p, sent)

    previous = {s: signal.signal(s, forward)
                for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    readers = []
    die_with_parent = die_with_parent_fn()
    try:
        for i in range(processes):
            env = process_env(dict(os.environ), i, processes, devices, port, external)
            p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 start_new_session=True,
                                 # between fork and exec: only prctl() and getppid()
                                 preexec_fn=die_with_parent)  # noqa: PLW1509
            procs.append(p)
            print(f"local.py: process {i} (pid {p.pid}): {' '.join(cmd)}", flush=True)
            t = threading.Thread(target=stream_output, args=(p, f"[p{i}] ".encode(), lock),
                                 daemon=True)
            t.start()
            readers.append(t)
        code = supervise(procs, grace, stop_requested)
    finally:
        for p in procs:  # never leave children behind, whatever happened above
            if p.poll() is None:
                signal_group(p, signal.SIGKILL)
                p.wait()
        for t in readers:
            t.join(timeout=5)
        for s, handler in previous.items():
            signal.signal(s, handler)
        if service is not None:
            service.shutdown()  # every worker has ended
    return code


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
