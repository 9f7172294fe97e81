#!/usr/bin/env bash
# The whole GPU check in one command: install what the machine lacks, run bench.py, run the gpu preset, print
# both. Everything it writes goes to out/gpu_check/ (git-ignored; OUT=DIR for another folder).
#
#   bash tools/gpu_check.sh                         # one GPU
#   NPROC=8 bash tools/gpu_check.sh                 # the gpu preset on 8 GPUs with torchrun
#   PRESET=tiny BENCH_ARGS="--device=cpu --steps=2" bash tools/gpu_check.sh   # the script itself, on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${PRESET:-gpu}
NPROC=${NPROC:-1}
BENCH_ARGS=${BENCH_ARGS:-}
TRAIN_ARGS=${TRAIN_ARGS:-}  # more of train.py's --key=value
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"

# 1. install: wheel files shipped in wheels/ first (a machine without internet), without their dependencies,
#    then whatever requirements.txt names that is still not installed
if compgen -G "wheels/*.whl" > /dev/null; then
    python -m pip install --no-deps wheels/*.whl
fi
missing=$(python - <<'PY'
import importlib.metadata as md
import re
for line in open("requirements.txt"):
    name = re.split(r"[<>=!~;\[ ]", line.strip(), maxsplit=1)[0]
    if name and not name.startswith("#"):
        try:
            md.version(name)
        except md.PackageNotFoundError:
            print(name)
PY
)
if [ -n "$missing" ]; then
    echo "installing: $missing"
    python -m pip install $missing
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"

# 2. the bench: SFT tokens/s and MFU, sampling with and without the KV cache, DPO vs ADPO step
python -m tools.bench --out="$OUT/bench.json" $BENCH_ARGS | tee "$OUT/bench.txt"

# 3. the whole pipeline on the preset, timed (progress bars go to train.log, not the screen)
start=$(date +%s)
launch=(python)
if [ "$NPROC" -gt 1 ]; then
    launch=(torchrun --standalone --nproc_per_node="$NPROC")
fi
status=0
"${launch[@]}" train.py --preset="$PRESET" $TRAIN_ARGS --out_dir="$OUT/run" > "$OUT/train.log" 2>&1 || status=$?
seconds=$(( $(date +%s) - start ))

echo
echo "== bench ($OUT/bench.json) =="
cat "$OUT/bench.txt"
echo
echo "== the $PRESET preset on $NPROC process(es): ${seconds} s, exit status $status ($OUT/train.log) =="
if [ "$status" -ne 0 ]; then
    tr '\r' '\n' < "$OUT/train.log" | tail -30
    exit "$status"
fi
cat "$OUT/run/report.md"
tr '\r' '\n' < "$OUT/train.log" |
    grep -a -o -E "(sft step [0-9]+: train loss [0-9.]+, val loss [0-9.]+|triplets: [0-9]+ written.*|done in .*)" || true
