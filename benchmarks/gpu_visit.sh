#!/bin/bash
# One GPU visit in two calls (each under the device's 10-minute limit), logs under $OUT:
#   bash benchmarks/gpu_visit.sh tests   every GPU test (the tensor-parallel ones need two GPUs)
#   bash benchmarks/gpu_visit.sh bench   (STEP=1: decode step cost, default path vs ALLMOS_DECODE_KERNELS=1,
#                                        and the workload with them on) the standard workload: this tree and the
#                                        tree in .old/
#                                        (a `git archive` of an older commit, if present), tp=2 if 2 GPUs
#   bash benchmarks/gpu_visit.sh tp      (2 GPUs) tensor-parallel and GPU engine tests, tp=1 vs tp=2 on the
#                                        standard workload, and where a tp=2 decode step's time goes
#   bash benchmarks/gpu_visit.sh step    (2 GPUs) the tensor-parallel GPU tests; then GPU 1 runs the fp8 store
#                                        diagnosis, the engine/GEMV GPU tests and bench_step in .prev/ (another
#                                        tree) while GPU 0 runs the standard workload here and in .prev/, and
#                                        bench_step here (at most 8 logs come back from a visit)
#   bash benchmarks/gpu_visit.sh check   (2 GPUs) every single-GPU test on GPU 1 while GPU 0 runs the standard
#                                        workload here, in .old/, here again, here with an fp8 KV cache, and
#                                        the decode attention kernels over bf16 and fp8 caches
#   bash benchmarks/gpu_visit.sh prefill (2 GPUs) GPU 0: prompt tok/s of long prompts against the matrix rate, per
#                                        chunk size, with a kernel table; GPU 1: the GEMVs in a graph, then the
#                                        attention kernels' prefill tile sweep
#   bash benchmarks/gpu_visit.sh compare (2 GPUs) this tree against the one in ${TREE:-.prev}/ (a `git archive`):
#                                        GPU 1 runs the GPU tests in $TESTS (default: kernels, fused paths,
#                                        engine); GPU 0 the decode step cost at $BATCHES (default 1 2 4 8 64 256)
#                                        here (with PDL_OFF=1 also with ALLMOS_PDL=0) and in the other tree, then
#                                        the standard workload in both; PREFILL=1 adds bench_prefill in both on
#                                        GPU 1 after the tests (copy this tree's benchmarks/bench_step.py into
#                                        the other tree for its graph-replay column; carry the tree there);
#                                        HOST=1 adds where the host's time goes per step (diag_host_phases.py,
#                                        both trees); TP=1 first runs the tensor-parallel GPU tests on both GPUs;
#                                        TEST_LIMIT: seconds for the tests (default 400)
#   bash benchmarks/gpu_visit.sh attn    (2 GPUs) attention work, this tree against ${TREE:-.prev}/: GPU 1 runs the
#                                        attention and engine GPU tests, then the attention kernels (prefill tile
#                                        sweep, decode over bf16 and fp8 caches); GPU 0 prompt tok/s of long
#                                        prompts, the shared-prefix benchmark (128 and 512 output tokens), the
#                                        decode step cost and the standard workload, each in both trees
#   bash benchmarks/gpu_visit.sh serve   the serving benchmark at saturation and at RATE requests/s (default
#                                        20), against the offline engine on the same requests; FastAPI etc.
#                                        come from wheels in .whl/ when the machine lacks them
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/allmos-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | head -3
start=$(date +%s)
stage() {  # stage NAME SECONDS CMD...: run with a hard limit, show the log's end
    local name=$1 limit=$2; shift 2
    timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
    echo "== $name: rc=$rc after $(( $(date +%s) - start )) s"; tail -n "${TAIL:-12}" "$OUT/$name.log"
}
if [ "$1" = tp ]; then
    TAIL=8 stage tp_tests 200 python -m pytest -m gpu -q -p no:cacheprovider -rfE tests/test_tp.py tests/test_gpu_engine.py
    TAIL=8 stage bench_tp 200 python benchmarks/bench_tp.py --child-timeout 95
    TAIL=10 stage bench_tp_step 150 python benchmarks/bench_tp_step.py --steps 50
elif [ "$1" = prefill ]; then
    (export CUDA_VISIBLE_DEVICES=1
     TAIL=40 stage gemv_graph 150 python benchmarks/bench_gemv_graph.py --batch 1 8
     TAIL=30 stage bench_kernels 200 python benchmarks/bench_kernels.py --sweep-prefill) &
    export CUDA_VISIBLE_DEVICES=0
    TAIL=40 stage bench_prefill 400 python benchmarks/bench_prefill.py --lens 2000 4000 8000 \
        --max-num-batched-tokens 4096 16384 32768 --profile
    wait
elif [ "$1" = compare ]; then
    tree=${TREE:-.prev}
    steps="--batch ${BATCHES:-1 2 4 8 64 256} --steps 60 --profile-steps 10"
    [ -n "$TP" ] && TAIL=6 stage tp_tests 200 python -m pytest -m gpu -q -p no:cacheprovider -rfE tests/test_tp.py
    half=$(( $(nproc) / 2 ))  # the tests and the benchmarks on separate cores (host timings stay clean)
    [ "$half" -ge 4 ] && taskset -cp "$half-$(( 2 * half - 1 ))" $BASHPID > /dev/null
    (export CUDA_VISIBLE_DEVICES=1
     [ "$half" -ge 4 ] && taskset -cp "0-$(( half - 1 ))" $BASHPID > /dev/null
     TAIL=8 stage gpu_tests ${TEST_LIMIT:-400} python -m pytest -m gpu -q -p no:cacheprovider -rfE ${TESTS:-tests/test_gemv.py \
         tests/test_fused_decode_path.py tests/test_kernels.py tests/test_fused_layers.py \
         tests/test_fused_decode_merge.py tests/test_fused_qk_rope_store.py tests/test_gpu_engine.py}
     if [ -n "$PREFILL" ]; then
         TAIL=6 stage bench_prefill 150 python benchmarks/bench_prefill.py --lens 2000 4000 8000
         (cd "$tree" && TAIL=6 PYTHONPATH=$PWD stage bench_prefill_other 150 python benchmarks/bench_prefill.py \
             --lens 2000 4000 8000)
     fi) &
    export CUDA_VISIBLE_DEVICES=0
    TAIL=8 stage bench_step 200 python benchmarks/bench_step.py $steps ${PDL_OFF:+--compare-env ALLMOS_PDL=0}
    (cd "$tree" && TAIL=8 PYTHONPATH=$PWD stage bench_step_other 150 python benchmarks/bench_step.py $steps)
    TAIL=2 stage bench_new 100 python bench.py
    (cd "$tree" && TAIL=2 PYTHONPATH=$PWD stage bench_other 100 python bench.py)
    [ -n "$HOST" ] && TAIL=4 stage host_phases 150 python benchmarks/diag_host_phases.py --batch 1 8 64
    [ -n "$HOST" ] && (cd "$tree" && TAIL=4 PYTHONPATH=$PWD stage host_phases_other 150 python \
        benchmarks/diag_host_phases.py --batch 1 8 64)
    wait
elif [ "$1" = attn ]; then
    tree=${TREE:-.prev}
    half=$(( $(nproc) / 2 ))
    [ "$half" -ge 4 ] && taskset -cp "$half-$(( 2 * half - 1 ))" $BASHPID > /dev/null
    (export CUDA_VISIBLE_DEVICES=1
     [ "$half" -ge 4 ] && taskset -cp "0-$(( half - 1 ))" $BASHPID > /dev/null
     TAIL=6 stage gpu_tests ${TEST_LIMIT:-300} python -m pytest -m gpu -q -p no:cacheprovider -rfE tests/test_kernels.py \
         tests/test_cascade_attention.py tests/test_fp8_kv_cache.py tests/test_fused_decode_merge.py \
         tests/test_cascade_engine.py tests/test_gpu_engine.py
     TAIL=4 stage bench_kernels 240 python benchmarks/bench_kernels.py --sweep-prefill --fp8) &
    export CUDA_VISIBLE_DEVICES=0
    TAIL=5 stage bench_prefill 120 python benchmarks/bench_prefill.py --lens 2000 4000 8000
    (cd "$tree" && TAIL=5 PYTHONPATH=$PWD stage bench_prefill_other 100 python benchmarks/bench_prefill.py \
        --lens 2000 4000 8000)
    TAIL=4 stage shared_prefix 200 bash -c "for n in 128 512; do python benchmarks/bench_shared_prefix.py \
        --cascade on --output-len \$n --warm-rounds 1; done"
    TAIL=6 stage bench_step 240 bash -c "python benchmarks/bench_step.py --batch 1 8 256 --steps 60 \
        --profile-steps 10; cd $tree && PYTHONPATH=\$PWD python benchmarks/bench_step.py --batch 1 8 256 --steps 60 \
        --profile-steps 10"
    TAIL=4 stage workload 200 bash -c "python bench.py; cd $tree && PYTHONPATH=\$PWD python bench.py"
    wait
elif [ "$1" = serve ]; then
    if ls .whl/*.whl > /dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
    fi
    TAIL=40 stage bench_serving 420 python benchmarks/bench_serving.py --launch --offline \
        --launch-model benchmarks/qwen3-0.6b --server-args "--load-format dummy" --request-rate inf "${RATE:-20}"
elif [ "$1" = step ]; then
    TAIL=6 stage tp_tests 150 python -m pytest -m gpu -q -p no:cacheprovider -rfE tests/test_tp.py
    (export CUDA_VISIBLE_DEVICES=1
     TAIL=30 stage diag_fp8_store 60 python benchmarks/diag_fp8_store.py
     TAIL=12 stage gpu_tests 200 python -m pytest -m gpu -q -p no:cacheprovider -rfE tests/test_gpu_engine.py \
         tests/test_fused_decode_path.py tests/test_gemv.py tests/test_fp8_kv_cache.py
     [ -d .prev ] && (cd .prev && TAIL=8 PYTHONPATH=$PWD stage bench_step_prev 150 python benchmarks/bench_step.py \
         --batch 1 8 64 --steps 40 --profile-steps 10)) &
    export CUDA_VISIBLE_DEVICES=0
    TAIL=2 stage bench_new 100 python bench.py
    [ -d .prev ] && (cd .prev && TAIL=2 PYTHONPATH=$PWD stage bench_prev 100 python bench.py)
    TAIL=8 stage bench_step 150 python benchmarks/bench_step.py --steps 40 --profile-steps 10
    wait
elif [ "$1" = check ]; then
    (CUDA_VISIBLE_DEVICES=1 TAIL=30 stage gpu_tests 570 python -m pytest -m gpu -q -p no:cacheprovider -rfE) &
    export CUDA_VISIBLE_DEVICES=0
    TAIL=2 stage bench_new 100 python bench.py
    [ -d .old ] && (cd .old && TAIL=2 PYTHONPATH=$PWD stage bench_old 100 python bench.py)
    TAIL=2 stage bench_new2 100 python bench.py
    TAIL=2 stage bench_fp8 100 python bench.py --kv-cache-dtype fp8
    TAIL=30 stage bench_kernels 120 python benchmarks/bench_kernels.py --fp8 --no-prefill
    wait
elif [ "$1" = tests ]; then
    TAIL=30 stage gpu_tests 560 python -m pytest -m gpu -q -p no:cacheprovider -rfE
else
    [ -n "$STEP" ] && TAIL=30 stage bench_step 220 python benchmarks/bench_step.py --steps 40 --profile-steps 10 \
        --compare-env ALLMOS_DECODE_KERNELS=1
    TAIL=2 stage bench_new 100 python bench.py
    [ -n "$STEP" ] && TAIL=2 ALLMOS_DECODE_KERNELS=1 stage bench_kernels_on 100 python bench.py
    [ -d .old ] && (cd .old && TAIL=2 PYTHONPATH=$PWD stage bench_old 100 python bench.py)
    [ "$(nvidia-smi -L | wc -l)" -ge 2 ] && TAIL=8 stage bench_tp 200 python benchmarks/bench_tp.py --child-timeout 95
fi
