"""Host JAX's coordination service outside the worker processes, so that losing process 0 (or
its whole host) is like losing any other process.

`jax.distributed` runs the coordination service (key-value store, barriers, heartbeats) inside
process 0. When process 0 dies, every other process's client loses its connection at once and
JAX aborts it with a C++ fatal error and a stack dump ("Terminating process because the JAX
distributed service detected fatal errors"), about 0.1 s later, before any Python code can
speak. jax 0.10 offers no way round that from Python: the client's `missed_heartbeat_callback`,
the hook that replaces the abort, is called with an `absl::Status`, which has no Python type,
so a Python callback ends in `std::bad_cast` and `terminate` instead.

So the service runs where no worker's death takes it along (`ServiceElsewhere` replaces JAX's
service factory in process 0 for the duration of `jax.distributed.initialize`; everything else
is JAX's own start-up):
- `--coordination-service process0` (the default): process 0 starts a helper process that hosts
  it and joins it as an ordinary client. The helper runs in its own session: a Ctrl-C in the
  terminal or a signal to process 0's group does not reach it. It survives process 0, not
  process 0's host.
- `--coordination-service external`: it is already running, started by `launch/local.py`'s
  launcher or as the coordinator pod of a JobSet (`bignlp-jax coordinator`, launch/k8s.py), off
  the workers' hosts; process 0 starts nothing.
When process 0 (or its host) dies, the service lives on and the others' peer watchdogs
(peer_watch.py) see process 0 fall silent and name it in one line, as for any other process.

A service started with a pipe on its stdin (process 0's helper, the launcher's) ends
- at once when told "done" (process 0 after JAX's shutdown barrier, the launcher after its
  workers ended);
- when its stdin closes without that (its starter died): after `linger` seconds, the heartbeat
  timeout, by which time the survivors' watchdogs (at 0.4 x) and JAX itself have seen the loss.
A coordinator pod's service (`--until signal`) ends on SIGTERM, when the JobSet completes.

    python -m bignlp_jax.parallel.coordination_host '{"address": "[::]:1234", ...}' LINGER
    bignlp-jax coordinator --port 8476 --processes 4 [--until signal|stdin]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from bignlp_jax.compat import jax as compat_jax
from bignlp_jax.parallel.layout import (
    HEARTBEAT_TIMEOUT,
    SHUTDOWN_TIMEOUT,
    CoordinatorError,
    loopback_only,
)

READY = "ready"
DONE = "done"
START_TIMEOUT = 60.0  # the helper's Python and jax import in ~0.5 s; a loaded host is slower


class ServiceHelper:
    """A handle on a service process on a pipe: process 0's helper (`jax.distributed` keeps it
    as its `service` and calls `shutdown()` after the client's shutdown barrier) or
    launch/local.py's (shut down once every worker has ended)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.pid = proc.pid

    def shutdown(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(f"{DONE}\n".encode())
                self.proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_helper(linger: float, **service_args: Any) -> ServiceHelper:
    """Start process 0's helper with JAX's service arguments (address, num_nodes,
    heartbeat_timeout, ...); returns once the service listens."""
    return start_service([sys.executable, "-m", __name__, json.dumps(service_args), str(linger)],
                         str(service_args.get("address")))


def start_service(cmd: list[str], address: str, env: dict[str, str] | None = None,
                  what: str = "the coordination service's helper process",
                  preexec_fn=None) -> ServiceHelper:
    """Start a service process (`cmd` prints READY once it listens, then reads "done" from its
    stdin); returns once the service listens. RuntimeError with JAX's message if it cannot
    start (e.g. the port is in use): `distributed.initialize` reports it like JAX's own."""
    proc = subprocess.Popen(
        # its stderr would only carry the service's own log lines about a lost process 0,
        # long after the survivors said so; a start failure comes back on stdout
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
        start_new_session=True, preexec_fn=preexec_fn)  # noqa: PLW1509
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT)
    line = proc.stdout.readline().decode().strip() if ready else ""
    proc.stdout.close()
    if line == READY:
        return ServiceHelper(proc)
    if not ready:
        proc.kill()
        raise RuntimeError(f"{what} did not start within {START_TIMEOUT:g} s")
    code = proc.wait()
    # jaxlib sometimes crashes (SIGSEGV) instead of raising when its server cannot bind
    raise RuntimeError(line.removeprefix("error: ") or
                       f"Failed to start RPC server on {address} ({what} ended with code {code})")


class ExternalService:
    """Process 0's stand-in for a service that runs outside the job: nothing to stop."""

    def shutdown(self) -> None:
        pass


class ServiceElsewhere:
    """Stands in for jaxlib's `_jax` module inside `jax._src.distributed` while process 0
    initializes: the service is started in a helper (or, `external`, not at all), everything
    else is jaxlib's."""

    def __init__(self, real, linger: float, external: bool = False):
        self._real, self._linger, self._external = real, linger, external

    def __getattr__(self, name: str):
        return getattr(self._real, name)

    def get_distributed_runtime_service(self, address: str, num_nodes: int,
                                        **kwargs: Any) -> ServiceHelper | ExternalService:
        if self._external:
            return ExternalService()
        return start_helper(self._linger, address=address, num_nodes=num_nodes, **kwargs)


def serve(service_args: dict[str, Any], linger: float, until: str = "stdin") -> int:
    """Host the service: until told "done" on stdin, or `linger` s after stdin closes
    (`until="stdin"`); or until SIGTERM/SIGINT (`until="signal"`, a coordinator pod)."""
    # the module jax.distributed itself calls (its home in jaxlib has moved between releases);
    # importing jax starts no backend, so the service touches no device
    _jax = compat_jax.jaxlib_module()

    stop = threading.Event()
    # A scheduler's stop signal reaches every process of the job step (SLURM signals the step's
    # whole cgroup, not one session): a service on a pipe must outlive it while the workers save
    # and shut down, so it ends only as told below (or by SIGKILL, after the scheduler's grace).
    # A coordinator pod's service ends on the SIGTERM that deletes the pod.
    on_stop = signal.SIG_IGN if until == "stdin" else (lambda signum, frame: stop.set())
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_stop)
    try:
        service = _jax.get_distributed_runtime_service(**service_args)
    except Exception as e:  # noqa: BLE001 - reported to the starter, which raises it
        if until != "stdin":
            raise  # `bignlp-jax coordinator` says it in one line
        print(f"error: {e}".replace("\n", " "), flush=True)
        return 2
    if until == "stdin":
        print(READY, flush=True)
        sys.stdout.close()  # the starter reads one line; later writes must not block or fail
        if _wait_for_parent() != DONE:
            time.sleep(linger)  # the starter is gone: let the others notice and say so first
    else:
        print(f"coordination service for {service_args['num_nodes']} processes listening on "
              f"{service_args['address']}; stops on SIGTERM", flush=True)
        while not stop.wait(1.0):
            pass
    shutdown = threading.Thread(target=service.shutdown, daemon=True)
    shutdown.start()
    shutdown.join(timeout=10)
    return 0


def _wait_for_parent() -> str:
    """Until process 0 says "done" or is gone: its pipe closes, or (should a child that it
    forked still hold the pipe open) this helper is handed to another parent."""
    parent = os.getppid()
    stdin = sys.stdin.buffer
    while os.getppid() == parent:
        ready, _, _ = select.select([stdin], [], [], 0.5)
        if ready:
            line = stdin.readline()
            if not line:
                return ""  # EOF: process 0 is gone
            if line.strip().decode() == DONE:
                return DONE
    return ""


def register(subparsers) -> None:
    """`bignlp-jax coordinator`: the service alone, e.g. as a JobSet's coordinator pod."""
    p = subparsers.add_parser(
        "coordinator", help="host the coordination service of a multi-process job (for "
                            "--coordination-service external)",
        description="Host JAX's coordination service for a job whose processes run with "
                    "--coordination-service external and --coordinator pointing here.")
    p.add_argument("--port", type=int, required=True, help="port to listen on")
    p.add_argument("--processes", type=int, required=True, help="processes in the job")
    p.add_argument("--bind", default=None,
                   help="address to listen on (default: this host's name, the address the "
                        "processes' --coordinator names; [::] is every interface, and JAX's "
                        "service has no authentication)")
    # the same options as before the sub-command; not given, they keep what was given there
    p.add_argument("--heartbeat-timeout", type=float, default=argparse.SUPPRESS,
                   metavar="SECONDS", help="a process silent this long is lost (default 60; "
                                           "give the workers the same)")
    p.add_argument("--shutdown-timeout", type=float, default=argparse.SUPPRESS,
                   metavar="SECONDS", help="wait this long for every process at exit "
                                           "(default 120)")
    p.add_argument("--until", choices=("signal", "stdin"), default="signal",
                   help="signal: run until SIGTERM (a pod; default); stdin: print 'ready', "
                        "stop when told 'done' on stdin or the heartbeat timeout after it "
                        "closes (launch/local.py)")
    p.set_defaults(func=cmd_coordinator)


def _check_port_free(bind: str, port: int) -> None:
    """CoordinatorError unless `bind:port` can be listened on (checked by binding it briefly)."""
    host = bind.strip("[]")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.bind(address)
    except OSError as e:
        raise CoordinatorError(f"could not start the coordination service on {bind}:{port}: "
                               f"{e.strerror or e}\n  fix: choose a free --port, or check "
                               "--bind") from None


def cmd_coordinator(args: argparse.Namespace) -> int:
    if args.processes < 1 or not 0 < args.port < 65536:
        raise CoordinatorError(f"coordinator: --processes {args.processes} must be at least 1 "
                               f"and --port {args.port} in 1..65535")
    if args.bind is None:
        args.bind = socket.gethostname()
        if (local := loopback_only(args.bind)) is not None:
            print(f"coordinator: note: {args.bind} resolves to {local} on this host, so only its "
                  "own processes can join; for processes on other hosts, --bind this host's "
                  "network address", file=sys.stderr, flush=True)
    if ":" in args.bind and not args.bind.startswith("["):
        args.bind = f"[{args.bind}]"  # a bare IPv6 address (a pod's IP)
    _check_port_free(args.bind, args.port)  # jaxlib crashes (SIGSEGV) on a taken port
    heartbeat = args.heartbeat_timeout or HEARTBEAT_TIMEOUT
    linger = int(math.ceil(heartbeat))
    service_args = {"address": f"{args.bind}:{args.port}", "num_nodes": args.processes,
                    "heartbeat_timeout": linger,
                    "shutdown_timeout": int(math.ceil(args.shutdown_timeout or SHUTDOWN_TIMEOUT))}
    try:
        return serve(service_args, linger, until=args.until)
    except RuntimeError as e:  # jaxlib's "Failed to start RPC server" (an XlaRuntimeError)
        raise CoordinatorError(f"could not start the coordination service on "
                               f"{service_args['address']}: {e}\n  fix: choose a free --port, "
                               "or check --bind") from e


if __name__ == "__main__":
    sys.exit(serve(json.loads(sys.argv[1]), float(sys.argv[2])))
