#!/usr/bin/env bash
# One command for a machine with a CUDA GPU (written for one H200; under 8 minutes):
#   1. installs the wheels of .whl/ (`make gpu-wheels` fills it) into /tmp/site when the machine lacks packages
#      (no package registry needed);
#   2. runs the CUDA tests (tests/test_cuda.py) and the GPU-relevant existing tests;
#   3. trains the R50 preset from scratch for 2 minutes (trainer.time_limit=120) at 800 px with bf16-mixed
#      autocast on generated shapes data with larger images (600-1000 px), and evaluates it;
#   4. runs `make bench`'s GPU rows (benchmarks/bench.py --device cuda --size gpu: loss, postprocess, train step,
#      inference, ours vs torchvision);
#   5. prints one summary table, then the bench table. Logs go to $OUT (if set) or outputs/gpu_check/.
# Without CUDA it says so and exits 0, having done nothing heavy.
#
# Usage (from anywhere): bash scripts/gpu_check.sh        PYTHON=python3.12 bash scripts/gpu_check.sh
set -u
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False for $PY, or torch is missing)."
    echo "gpu_check: nothing to check on this machine; run it on a machine with a GPU. Exiting 0."
    exit 0
fi

LOG=${OUT:-outputs/gpu_check}
mkdir -p "$LOG"
LOG=$(cd "$LOG" && pwd)
started=$(date +%s)
echo "gpu_check: logs in $LOG"

if compgen -G ".whl/*.whl" >/dev/null; then
    echo "gpu_check: installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into /tmp/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >"$LOG/pip.log" 2>&1 || { echo "gpu_check: wheel install failed (see $LOG/pip.log)"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
missing=$("$PY" - <<'PY'
import importlib
names = ["hydra", "omegaconf", "pycocotools", "albumentations", "scipy", "pydantic", "pytest", "tqdm", "tensorboard",
         "cv2", "torchvision"]
print(" ".join(n for n in names if importlib.util.find_spec(n) is None))
PY
)
if [ -n "$missing" ]; then
    echo "gpu_check: missing Python packages: $missing (run \`make gpu-wheels\` on a machine with a registry, copy .whl/)"
    exit 1
fi

{ nvidia-smi -L 2>/dev/null; "$PY" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision",
torchvision.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0),
"bf16", torch.cuda.is_bf16_supported())'; } >"$LOG/env.txt" 2>&1
cat "$LOG/env.txt"

declare -A STATUS SECONDS_OF DETAIL
step() {  # step NAME TIMEOUT_S LOGFILE COMMAND...
    local name=$1 limit=$2 log=$3; shift 3
    local t0 rc
    t0=$(date +%s)
    echo "gpu_check: [$name] $* (at most ${limit} s, log $log)"
    timeout --signal=TERM --kill-after=20 "$limit" "$@" >"$log" 2>&1
    rc=$?
    SECONDS_OF[$name]=$(( $(date +%s) - t0 ))
    if [ $rc -eq 0 ]; then STATUS[$name]=ok; elif [ $rc -eq 124 ]; then STATUS[$name]="timeout"; else STATUS[$name]="FAILED ($rc)"; fi
    return $rc
}

# 1. CUDA tests, then the existing tests whose code runs on the GPU path (losses, matcher, postprocess, AMP, EMA)
step "CUDA tests" 150 "$LOG/pytest_cuda.log" "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py
DETAIL["CUDA tests"]=$(tail -n 1 "$LOG/pytest_cuda.log")
step "GPU-relevant tests" 120 "$LOG/pytest_more.log" "$PY" -m pytest -q -p no:cacheprovider -m "not slow" \
    tests/test_fast_paths.py tests/test_losses.py tests/test_focal_variants.py tests/test_postprocess.py \
    tests/test_amp_ema.py tests/test_optim.py
DETAIL["GPU-relevant tests"]=$(tail -n 1 "$LOG/pytest_more.log")

# 2. R50 at 800 px, bf16-mixed, 2 minutes of training from scratch on larger generated shapes, then evaluation
step "R50 800px bf16 2-min train" 300 "$LOG/train.log" "$PY" scripts/train.py \
    model=retinanet_r50 loss=focal trainer=default optim=sgd \
    model.net.weights=null model.net.norm=bn model.net.frozen_stages=0 \
    device=cuda trainer.precision=bf16-mixed trainer.channels_last=true trainer.time_limit=120 trainer.epochs=100 \
    trainer.batch_size=16 trainer.eval_batch_size=32 trainer.num_workers=10 trainer.progress=false \
    trainer.max_bad_steps=20 evaluation.plots.enabled=false \
    data.root=/tmp/gpu_check_shapes data.min_size=800 data.max_size=1333 data.eval_min_size=800 \
    data.eval_max_size=1333 data.generate.num_train=1200 data.generate.num_val=100 data.generate.workers=14 \
    '+data.generate.image_size=[600,1000]' '+data.generate.object_size=[24,400]' \
    "hydra.run.dir=$LOG/train_run"
DETAIL["R50 800px bf16 2-min train"]=$(grep -E "AP|images/s|img/s" "$LOG/train.log" | tail -n 2 | tr '\n' ' ' | cut -c1-200)

# 3. the bench's GPU rows: ours vs torchvision on the GPU
step "bench --device cuda" 150 "$LOG/bench.log" "$PY" benchmarks/bench.py --device cuda --size gpu --no-memory \
    --out "$LOG/bench_cuda.json"
DETAIL["bench --device cuda"]="$LOG/bench_cuda.json"

echo
echo "| check | result | seconds | detail |"
echo "|---|---|---|---|"
failed=0
for name in "CUDA tests" "GPU-relevant tests" "R50 800px bf16 2-min train" "bench --device cuda"; do
    echo "| $name | ${STATUS[$name]} | ${SECONDS_OF[$name]} | ${DETAIL[$name]:-} |"
    [ "${STATUS[$name]}" = ok ] || failed=1
done
echo
sed -n '/^| item |/,/^$/p' "$LOG/bench.log"
echo "gpu_check: $(( $(date +%s) - started )) s in all; logs in $LOG"
exit $failed
