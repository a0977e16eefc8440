#!/usr/bin/env bash
# GPU benchmark, for whoever has a CUDA machine (under 8 minutes on one H100): the training loop with
# bf16 autocast and channels_last against in-memory tensors, the loader keeping up (workers 0 vs 8),
# checkpoint save and resume times, and DDP over every GPU present. Run from the repository root:
#
#     bash benchmarks/gpu.sh            # results in benchmarks/results/ and, if set, $OUT/
#
# It uses the machine's python3 with its own torch. Packages histokt needs that such a machine may lack
# (zarr and its dependencies) can be carried as wheels in .whl/ (see benchmarks/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/histokt-site .whl/*.whl
    export PYTHONPATH=/tmp/histokt-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
WORK=${WORK:-/tmp/histokt-gpu-bench}
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'gpus', torch.cuda.device_count())"
[ "$GPUS" -ge 1 ] || { echo "gpu.sh: no CUDA device visible" >&2; exit 2; }

run() {  # name, then benchmarks/train.py arguments
    local name=$1; shift
    echo "== $name"
    $PY benchmarks/train.py --work "$WORK" --device cuda --out "$name" "$@"
    if [ -n "${OUT:-}" ]; then cp "benchmarks/results/$name.json" "$OUT/"; fi
}

# bf16 + channels_last (the defaults on CUDA), loader with 8 workers, batch 256
run gpu-bf16-w8 --images 6144 --batch-size 256 --workers 8 --epochs 2
# the loader alone on the main process: how much the workers matter
run gpu-bf16-w0 --images 6144 --batch-size 256 --workers 0 --epochs 1
# fp32, for the bf16/channels_last gain
run gpu-fp32-w8 --images 6144 --batch-size 256 --workers 8 --epochs 1 --precision fp32

if [ "$GPUS" -ge 2 ]; then
    echo "== DDP over $GPUS GPUs"
    $PY -m histokt train --store "$WORK/store-6144.zarr" --dataset bench --out "$WORK/ddp" --epochs 2 \
        --batch-size $((256 * GPUS)) --workers 6 --nproc "$GPUS" --optimizer sgd --lr 0.01 --no-progress
    $PY -c "import json,sys; r=json.load(open('$WORK/ddp/result.json')); print('ddp world', r['world_size'], 'seconds', round(r['seconds'],1))"
else
    echo "== DDP: one GPU here, skipped (the CPU tests cover 2-process gloo DDP)"
fi
