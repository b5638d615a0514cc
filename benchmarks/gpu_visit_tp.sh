#!/bin/bash
# One visit on a two-GPU machine for tensor parallelism: the tp GPU tests, then the standard workload at
# tp=1 and tp=2. Full logs go to $OUT.
# Usage (from the repo root): bash benchmarks/gpu_visit_tp.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/allmos-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/smi.txt"; nvidia-smi topo -m >> "$OUT/smi.txt"
git log -1 --format='commit %h %s' 2>/dev/null | tee -a "$OUT/smi.txt"; head -2 "$OUT/smi.txt"
start=$(date +%s)
stage() {  # stage NAME SECONDS CMD...: run with a hard limit (the whole process group), show the log's end
    local name=$1 limit=$2; shift 2
    timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
    echo "== $name: rc=$rc after $(( $(date +%s) - start )) s"; tail -n "${TAIL:-12}" "$OUT/$name.log"
}
TAIL=20 stage pytest 240 python -m pytest -m gpu tests/test_tp.py -q -p no:cacheprovider -rA
TAIL=8 stage bench 300 python benchmarks/bench_tp.py --child-timeout 140
