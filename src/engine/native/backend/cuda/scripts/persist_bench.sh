#!/bin/bash
# One device call: batch-1 decode kernel by kernel (the default) against the persistent kernel
# (DYN_CUDA_PERSIST=1), alternated within the call, plus a traced launch of the persistent kernel.
# Usage (device tool, carry [".cudadev"]): bash src/engine/native/backend/cuda/scripts/persist_bench.sh
# Needs .cudadev/ as docs/cuda_backend.md builds it (bin/, lib/, llama8b/). ROUNDS (3), CONTEXTS
# ("512 4096"); BINS (".cudadev/bin"): several builds' binary folders compare their persistent
# kernels in the same call (the default path runs from the first); VARIANTS ("name:VAR=VALUE ..."):
# the first build's persistent kernel again under each setting, e.g. VARIANTS="nographs:DYN_CUDA_GRAPHS=0"
# (or a setting of a patch in docs/experiments, built into the first). Every run has a short timeout,
# so a hung kernel costs seconds, not the call. Traces (and their per-block CSV) go under $OUT.
cd "$(dirname "$0")/../../../../../.."  # the repository root
export LD_LIBRARY_PATH=$PWD/.cudadev/lib:/usr/local/cuda/lib64
BINS=${BINS:-.cudadev/bin}; OUT=${OUT:-/tmp/out}; mkdir -p $OUT
FIRST=${BINS%% *}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
for B in $BINS; do
  for P in 0 1; do
    [ "$P" = 0 ] && [ "$B" != "$FIRST" ] && continue
    echo "$B cuda_backend_test, DYN_CUDA_PERSIST=$P: $(DYN_CUDA_PERSIST=$P timeout 120 $B/cuda_backend_test --gtest_brief=1 2>&1 | grep -E "PASSED|FAILED|Timeout|rror" | head -4 | tr '\n' ' ')"
  done
done
# ms per step and the token hash (equal in both modes: c52217800b211f32 at 512, 300afaab6b5af72b at 4096)
bench() { timeout 40 $1/dyn_cuda_bench --config .cudadev/llama8b --prompts "" --context $2 --steps 100 --batches 1 2>&1 | grep -E "^ +1 |rror" | awk '{print $2, $6}'; }
for r in $(seq ${ROUNDS:-3}); do
  for c in ${CONTEXTS:-512 4096}; do
    line="context $c: default $(DYN_CUDA_PERSIST=0 bench $FIRST $c)"
    for B in $BINS; do line="$line | $B persistent $(DYN_CUDA_PERSIST=1 bench $B $c)"; done
    for V in $VARIANTS; do line="$line | ${V%%:*} $(export DYN_CUDA_PERSIST=1 "${V#*:}"; bench $FIRST $c)"; done
    echo "$line"
  done
done
for B in $BINS; do
  for c in ${CONTEXTS:-512 4096}; do
    name=$(basename $B)_$c
    rm -f $OUT/trace_$name.csv
    DYN_CUDA_GRAPHS=0 DYN_CUDA_PERSIST=1 DYN_CUDA_PERSIST_TRACE=1 DYN_CUDA_PERSIST_TRACE_FILE=$OUT/trace_$name.csv timeout 60 \
      $B/dyn_cuda_bench --config .cudadev/llama8b --prompts "" --context $c --steps 1 --batches 1 > $OUT/trace_$name.txt 2>&1
    gzip -f $OUT/trace_$name.csv
    echo "trace $B at context $c: $OUT/trace_$name.txt ($(grep -c 'persistent kernel:' $OUT/trace_$name.txt) launches)"
  done
done
