#!/bin/bash
# Variants of one config, each in a process of its own (as a user runs them), alternating for
# ROUNDS rounds: `bignlp-jax bench` per variant and round, one line each.
#
#   benchmarks/process_ab.sh CONFIG ROUNDS "OVERRIDES A" "OVERRIDES B" ...
#   benchmarks/process_ab.sh configs/bench/cpu_m.yaml 5 "" \
#       "model.kernel_glue=reference model.kernel_cross_entropy=reference"
#
# Prints: round, variant number, tok/s over the mean step, tok/s of the fastest step, page
# faults per step. Run it on an idle machine; compare variants within one run (per-round ratios).
# Another checkout (e.g. a branch) runs the same way from its own directory.
set -euo pipefail
config=$1 rounds=$2
shift 2
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
for round in $(seq 1 "$rounds"); do
  for i in $(seq 1 $#); do
    # shellcheck disable=SC2086  # the overrides are words
    "$python" -m bignlp_jax.cli bench "$config" --steps "${STEPS:-15}" ${!i} 2>/dev/null | tail -1 |
      "$python" -c "import json, sys; d = json.load(sys.stdin)
print($round, $i, round(d['tokens_per_sec']), round(d['tokens_per_sec'] * d['step_time_s'] / d['step_time_spread'][0]), d['page_faults_per_step'], flush=True)"
  done
done
