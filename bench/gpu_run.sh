#!/usr/bin/env bash
# One device command for the lent H100/H200 (Python 3.12, torch 2.11, transformers 5.17, peft; no trl/datasets,
# no internet): installs the carried wheels, then runs the GPU benchmarks under one overall deadline.
#   device run: command "bash bench/gpu_run.sh", carry [".whl"], timeout_s 420
# Writes under $OUT (at most 8 files come back; 5 are used here): env.txt, lora_memory.{json,log},
# rollout.{json,log}. Each step runs under `timeout`, capped by what is left of DEADLINE_S (default 360 s),
# so the whole script ends within ~6 minutes even if a step hangs.
# Local dry run (no GPU, no wheels): OUT=/tmp/out SKIP_WHEELS=1 PY=/work/venv/bin/python DEADLINE_S=150 \
#     ARGS="--device cpu --tiny" taskset -c 0 bash bench/gpu_run.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_run_out}
mkdir -p "$OUT"
DEADLINE_S=${DEADLINE_S:-360}
ARGS=${ARGS:-}          # extra arguments for both benchmarks (the local dry run passes --device cpu --tiny)
PY=${PY:-python3}       # on the device machine python3 is the one that holds torch
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

if [ -z "${SKIP_WHEELS:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || echo "WARNING: wheel install failed; trl/datasets may be missing"
fi
export PYTHONPATH=/tmp/site:src${PYTHONPATH:+:$PYTHONPATH}

left() { echo $((DEADLINE_S - SECONDS)); }
# step NAME CAP_S CMD...: run CMD under timeout min(CAP_S, time left - 5 s), output to $OUT/NAME.log and stdout
step() {
    local name=$1 cap=$2 t
    shift 2
    t=$(left); t=$((t - 5 < cap ? t - 5 : cap))
    if [ "$t" -lt 20 ]; then
        echo "== $name: skipped, only $(left)s left of DEADLINE_S=$DEADLINE_S" | tee "$OUT/$name.log"
        return 0
    fi
    echo "== $name (timeout ${t}s, at ${SECONDS}s): $*"
    timeout -k 10 "$t" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: rc=$rc after ${SECONDS}s$([ "$rc" = 124 ] && echo ' (TIMED OUT)')"
}

{
    nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1
    "$PY" - <<'EOF' 2>&1
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "transformers", "peft", "accelerate", "tokenizers", "trl", "datasets", "pyarrow", "pandas",
             "huggingface_hub", "fsspec", "openai", "pydantic", "math_verify"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '?')}  ({mod.__file__})")
    except Exception as exc:
        print(f"{name} FAILED: {type(exc).__name__}: {exc}")
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
} 2>&1 | tee "$OUT/env.txt"

# 1. LoRA reference memory (~30 s on an H100: three modes, two steps each)
# shellcheck disable=SC2086
step lora_memory 75 "$PY" bench/lora_memory.py --json "$OUT/lora_memory.json" $ARGS

# STEP_TIME_BENCH
# 2. Rollout tokens/s (stops starting new measurements when its --budget-s is spent; rows are saved as they finish)
# shellcheck disable=SC2086
step rollout 170 "$PY" bench/rollout_speed.py --json "$OUT/rollout.json" --repeats 1 --batches 32,128 \
    --paths trl,static_compile,static,generate_batch --budget-s 120 $ARGS

# 3. Step time with a slow teacher (ours vs plain TRL + group-by-group judge), whatever time is left
if [ -z "$ARGS" ]; then
    step step_time 600 "$PY" bench/step_time.py --gpu --steps 3 --json "$OUT/step_time.json" \
        --arms "trl_instant,ours@2s d=1,trl_group@2s,ours@2s d=1 trl-gen,ours@10s d=2"
fi

echo "== done after ${SECONDS}s; files in $OUT:"
ls -la "$OUT"
