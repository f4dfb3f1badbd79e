"""Host JAX's coordination service in a helper process, so that losing process 0 is like losing
any other process.

`jax.distributed` runs the coordination service (key-value store, barriers, heartbeats) inside
process 0. When process 0 dies, every other process's client loses its connection at once and
JAX aborts it with a C++ fatal error and a stack dump ("Terminating process because the JAX
distributed service detected fatal errors"), about 0.1 s later, before any Python code can
speak. jax 0.10 offers no way round that from Python: the client's `missed_heartbeat_callback`,
the hook that replaces the abort, is called with an `absl::Status`, which has no Python type,
so a Python callback ends in `std::bad_cast` and `terminate` instead.

So process 0 starts this helper to host the service and joins it as an ordinary client
(`service_in_helper` replaces JAX's service factory for the duration of
`jax.distributed.initialize`; everything else is JAX's own start-up). The helper runs in its
own session: a Ctrl-C in the terminal or a signal to process 0's group does not reach it. When
process 0 dies, the service lives on and the others' peer watchdogs (peer_watch.py) see process
0 fall silent and name it in one line, as for any other process.

The helper ends
- at once when process 0 shuts `jax.distributed` down normally (at exit, after every process
  passed JAX's shutdown barrier): it is told "done" on its stdin;
- when its stdin closes without that (process 0 died, or left without shutting down): after
  `linger` seconds, the heartbeat timeout, by which time the survivors' watchdogs (at 0.4 x) and
  JAX itself have seen process 0 go. It never outlives a failed job by more than that.

    python -m bignlp_jax.parallel.coordination_host '{"address": "[::]:1234", ...}' LINGER
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any

READY = "ready"
DONE = "done"
START_TIMEOUT = 60.0  # the helper's Python and jax import in ~0.5 s; a loaded host is slower


class ServiceHelper:
    """Process 0's handle on the helper; `jax.distributed` keeps it as its `service` and calls
    `shutdown()` after the client's shutdown barrier."""

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
    """Start the helper with JAX's service arguments (address, num_nodes, heartbeat_timeout,
    ...); returns once the service listens. RuntimeError with JAX's message if it cannot
    start (e.g. the port is in use): `distributed.initialize` reports it like JAX's own."""
    proc = subprocess.Popen(
        [sys.executable, "-m", __name__, json.dumps(service_args), str(linger)],
        # its stderr would only carry the service's own log lines about a lost process 0,
        # long after the survivors said so; a start failure comes back on stdout
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        start_new_session=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT)
    line = proc.stdout.readline().decode().strip() if ready else ""
    proc.stdout.close()
    if line == READY:
        return ServiceHelper(proc)
    if not ready:
        proc.kill()
        raise RuntimeError(f"the coordination service helper did not start within "
                           f"{START_TIMEOUT:g} s")
    code = proc.wait()
    # jaxlib sometimes crashes (SIGSEGV) instead of raising when its server cannot bind
    raise RuntimeError(line.removeprefix("error: ") or
                       f"Failed to start RPC server on {service_args.get('address')} (the "
                       f"coordination service's helper process ended with code {code})")


class ServiceInHelper:
    """Stands in for jaxlib's `_jax` module inside `jax._src.distributed` while process 0
    initializes: the service is started in the helper, everything else is jaxlib's."""

    def __init__(self, real, linger: float):
        self._real, self._linger = real, linger

    def __getattr__(self, name: str):
        return getattr(self._real, name)

    def get_distributed_runtime_service(self, address: str, num_nodes: int,
                                        **kwargs: Any) -> ServiceHelper:
        return start_helper(self._linger, address=address, num_nodes=num_nodes, **kwargs)


def serve(service_args: dict[str, Any], linger: float) -> int:
    """The helper's body: host the service until told "done", or `linger` s after stdin
    closes."""
    # the module jax.distributed itself calls (its home in jaxlib has moved between releases);
    # importing jax starts no backend, so the helper touches no device
    from jax._src.lib import _jax

    # A scheduler's stop signal reaches every process of the job step (SLURM signals the step's
    # whole cgroup, not one session): the service must outlive it while the workers save and
    # shut down, so it ends only as told below (or by SIGKILL, after the scheduler's grace).
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    try:
        service = _jax.get_distributed_runtime_service(**service_args)
    except Exception as e:  # noqa: BLE001 - reported to process 0, which raises it
        print(f"error: {e}".replace("\n", " "), flush=True)
        return 2
    print(READY, flush=True)
    sys.stdout.close()  # process 0 reads one line; later writes must not block or fail
    told = _wait_for_parent()
    if told != DONE:
        time.sleep(linger)  # process 0 is gone: let the others notice and say so first
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


if __name__ == "__main__":
    sys.exit(serve(json.loads(sys.argv[1]), float(sys.argv[2])))
