#!/usr/bin/env bash
# Single-GPU throughput of the Llama-style 126M and 1.3B presets: bfloat16, cuDNN flash attention,
# several remat policies; prints one Markdown table (paste it into benchmarks/RESULTS.md).
#
#   benchmarks/gpu.sh [OUT_DIR]
#
# Installs nothing from the network. It needs jax with CUDA, flax, optax, orbax-checkpoint,
# pydantic, pyyaml, numpy. Wheels for packages a machine lacks can be put in .whl/base (always
# installed to a private folder) and .whl/fallback (flax/optax, used only if the machine's own
# versions fail the smoke test); see benchmarks/RESULTS.md for how they were fetched.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-/tmp/bignlp_gpu_bench}}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT_DIR"
SITE=/tmp/bignlp_site
export PYTHONPATH="$PWD"
if compgen -G ".whl/base/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/base/*.whl || exit 1
  export PYTHONPATH="$SITE:$PWD"
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1
# XLA allocates 75% of GPU memory by default; the 1.3B runs without remat want more.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true
"$PY" - <<'EOF'
import sys, jax, flax, optax
print("python", sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__,
      "optax", optax.__version__, "devices", jax.devices())
EOF

smoke() {
  timeout 120 "$PY" -m bignlp_jax.cli bench configs/tiny.yaml model.dtype=bfloat16 \
    model.kernel_attention=cudnn model.num_heads=4 data.seq_len=128 model.max_seq_len=128 \
    run.dir="$OUT_DIR/smoke" --steps 2 --warmup 1 > "$OUT_DIR/smoke.log" 2>&1
}
if ! smoke; then
  echo "smoke test failed with the machine's packages:"; tail -5 "$OUT_DIR/smoke.log"
  if compgen -G ".whl/fallback/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE-fallback" .whl/fallback/*.whl || exit 1
    export PYTHONPATH="$SITE-fallback:$PYTHONPATH"
    echo "retrying with the carried flax/optax"
    smoke || { tail -30 "$OUT_DIR/smoke.log"; exit 1; }
  else
    tail -30 "$OUT_DIR/smoke.log"; exit 1
  fi
fi
tail -1 "$OUT_DIR/smoke.log" | cut -c1-300
timeout 120 "$PY" benchmarks/gpu_check_attention.py || echo "cuDNN attention check FAILED"

"$PY" benchmarks/gpu_bench.py "$OUT_DIR"
