#!/usr/bin/env bash
# GPU benchmark for one short device session (about 5 minutes on one H100/H200, machine start not included):
# the most important figure first, each result written to benchmarks/results/ (and $OUT/, where set) as soon
# as it is measured, so a session cut short keeps what it measured. Run from the repository root:
#
#     bash benchmarks/gpu.sh            # SECONDS_EACH=20 by default: each side's steady-state window
#
# 1. full loop / in-memory step, ResNet18, batch 256, 272 px content, the CUDA defaults (splits on the
#    device, bf16, channels_last)                                                  gpu-device-272.json
# 2. the same with PCam-like 93 px content, mirror-padded to 272 px on the device   gpu-device-93.json
# 3. the in-memory step with torch.compile (vs 1's in-memory step: the compile default)  gpu-compile.json
#    and in fp16 with the loss scaler (what a V100 or T4 would run)               gpu-fp16.json
# 4. a whole MHIST-size cell (2,200 train patches, 10 epochs), splits on the device, then the loader path
#                                                                  gpu-cell-device.json, gpu-cell-loader.json
# 5. full loop / in-memory step through the loader (8 workers, recycled buffers)  gpu-loader-272.json
#
# It uses the machine's python3 with its own torch (recorded in each JSON). Packages histokt needs that such
# a machine may lack (zarr and its dependencies) can be carried as wheels in .whl/ (see benchmarks/README.md).
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
S=${SECONDS_EACH:-20}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'gpus', torch.cuda.device_count())"
[ "$($PY -c 'import torch; print(torch.cuda.device_count())')" -ge 1 ] || { echo "gpu.sh: no CUDA device visible" >&2; exit 2; }

run() {  # name, then benchmarks/train.py arguments; a failed figure is reported and the next one runs
    local name=$1; shift
    echo "== $name ($(date +%T))"
    $PY benchmarks/train.py --work "$WORK" --device cuda --out "$name" --seconds "$S" "$@" \
        || echo "gpu.sh: $name failed (exit $?)" >&2
    if [ -n "${OUT:-}" ] && [ -f "benchmarks/results/$name.json" ]; then cp "benchmarks/results/$name.json" "$OUT/"; fi
}

COMMON=(--batch-size 256 --workers 8 --no-resume)
run gpu-device-272 --images 2048 "${COMMON[@]}"
run gpu-device-93 --images 2048 --content 93 "${COMMON[@]}"
run gpu-compile --images 2048 "${COMMON[@]}" --memory-only --compile
run gpu-fp16 --images 2048 "${COMMON[@]}" --memory-only --precision fp16
run gpu-cell-device --images 3152 --batch-size 64 --workers 8 --cell 10
run gpu-cell-loader --images 3152 --batch-size 64 --workers 8 --cell 10 --data-on loader
run gpu-loader-272 --images 2048 "${COMMON[@]}" --data-on loader
echo "== done ($(date +%T))"
