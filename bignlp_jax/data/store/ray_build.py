"""Run the tasks of a raw-file store build (`raw_build.py`) as Ray tasks.

`--ray ADDRESS` joins a running cluster (`ray start --head` on one node, `ray start --address`
on the others; bignlp_jax installed on every node); `--ray local` starts a cluster in this
process for this machine's cores. Each input file is one task with one CPU. A task whose worker
or node dies is run again elsewhere (Ray's retries of system failures, up to MAX_RETRIES); a
task that fails on bad input ends the build with that input's one-line message. A task writes
its shards and its record into the store itself, so the driver only waits, and a build that is
stopped outright resumes where it was (the records say which inputs are done).
"""

from __future__ import annotations

import logging

from bignlp_jax.data.store.raw_build import InputTask, OnDone, build_input
from bignlp_jax.errors import UserError

MAX_RETRIES = 4


def runner(address: str):
    """A `tokenize_files` runner that sends the tasks to the Ray cluster at `address`."""
    try:
        import ray  # the `ray` extra
    except ImportError:
        raise UserError("--ray needs the ray package\n"
                        "  fix: pip install 'bignlp_jax[ray]', or leave --ray out to build "
                        "in this process") from None

    def run(tasks: list[InputTask], on_done: OnDone) -> None:
        if not tasks:
            return
        try:
            ray.init(address=None if address == "local" else address, log_to_driver=False,
                     logging_level=logging.WARNING, include_dashboard=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UserError(f"cannot join the Ray cluster at {address}: "
                            f"{str(e).splitlines()[0][:200]}\n  fix: start it (`ray start "
                            "--head`) and pass its address (HOST:6379), or --ray local") from None
        try:
            build = ray.remote(num_cpus=1, max_retries=MAX_RETRIES,
                               retry_exceptions=False)(build_input)
            refs = {build.remote(task): task for task in tasks}
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    try:
                        entries = ray.get(ref)
                    except ray.exceptions.RayTaskError as e:
                        if isinstance(e.cause, UserError):
                            raise e.cause from None
                        raise
                    on_done(refs[ref], entries)
        finally:
            ray.shutdown()

    return run
