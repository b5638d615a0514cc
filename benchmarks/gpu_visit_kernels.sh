#!/bin/bash
# One visit on nvidia-h200 for the decode-step kernels: the GPU tests of the new kernels and the engine
# first, then the step benchmark (new path vs ALLMOS_DECODE_KERNELS=0 in the same visit), then the standard
# workload both ways. Full logs go to $OUT; each stage prints the end of its log.
# Usage (device tool, repo root): bash benchmarks/gpu_visit_kernels.sh     (SKIP_BENCH=1: tests only)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/allmos-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/smi.txt"
git log -1 --format='commit %h %s' 2>/dev/null | tee -a "$OUT/smi.txt"; head -2 "$OUT/smi.txt"
start=$(date +%s)
stage() {  # stage NAME SECONDS CMD...: run with a hard limit, show the log's end
    local name=$1 limit=$2; shift 2
    timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
    echo "== $name: rc=$rc after $(( $(date +%s) - start )) s"; tail -n "${TAIL:-12}" "$OUT/$name.log"
}
TAIL=25 stage kernel_tests 420 python -m pytest -m gpu -x -q -p no:cacheprovider tests/test_gemv.py \
    tests/test_fused_qk_rope_store.py tests/test_fused_decode_merge.py tests/test_fused_decode_path.py \
    tests/test_fused_layers.py tests/test_kernels.py
TAIL=15 stage engine_tests 300 python -m pytest -m gpu -x -q -p no:cacheprovider tests/test_gpu_engine.py
[ -n "$SKIP_BENCH" ] && exit 0
TAIL=40 stage bench_step 560 python benchmarks/bench_step.py --compare-env ALLMOS_DECODE_KERNELS=0
TAIL=3 stage bench_new 240 python bench.py
TAIL=3 ALLMOS_DECODE_KERNELS=0 stage bench_old 240 python bench.py
