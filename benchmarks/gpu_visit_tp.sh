#!/bin/bash
# Tensor parallelism on a two-GPU machine, in one go: a tiny tp=2 generate with CUDA graphs (stack dumps
# if stuck), the standard workload at tp=1 and tp=2, then the tp GPU tests. Full logs go to $OUT.
# Usage (repo root): bash benchmarks/gpu_visit_tp.sh
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
ALLMOS_TP_STACKS_AFTER_S=70 stage diag 100 python benchmarks/diag_tp.py
TAIL=8 stage bench 300 python benchmarks/bench_tp.py --child-timeout 140
TAIL=20 stage pytest 170 python -m pytest -m gpu tests/test_tp.py -x -q -p no:cacheprovider
