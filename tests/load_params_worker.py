"""One process of the shared-verification test (tests/test_checkpoint_multiprocess.py).

    python load_params_worker.py PORT PROCESS_ID MODEL_JSON RUN_DIR...

Joins a 2-process loopback job the way the CLI does, then calls `load_params` on each run in
turn (all processes together), recording which files this process checksummed. Prints one JSON
line per run: {"run", "checked": [...], "error": message or null}. Exits 2 if any load failed.
"""

from __future__ import annotations

import json
import sys


def main(port: str, process_id: str, model_json: str, *runs: str) -> int:
    from bignlp_jax.parallel.distributed import Layout, initialize

    initialize(Layout("flags/env", 2, int(process_id), f"127.0.0.1:{port}"), 120, "export",
               heartbeat_timeout=60)
    from bignlp_jax.checkpoint import integrity, load_params
    from bignlp_jax.config import ModelConfig
    from bignlp_jax.errors import UserError

    checked: list[str] = []
    check_file = integrity.check_file

    def counting(state_dir, name, size, crc):
        checked.append(name)
        return check_file(state_dir, name, size, crc)

    integrity.check_file = counting
    code = 0
    for run in runs:
        checked.clear()
        try:
            load_params(run, ModelConfig(**json.loads(model_json)))
            error = None
        except UserError as e:
            error, code = str(e), 2
        print(json.dumps({"run": run, "checked": list(checked), "error": error}), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
