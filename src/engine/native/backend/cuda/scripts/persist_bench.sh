#!/bin/bash
# One device call: batch-1 decode kernel by kernel (the default) against the persistent kernel
# (DYN_CUDA_PERSIST=1), alternated within the call, plus a traced launch of the persistent kernel.
# Usage (device tool, carry [".cudadev"]): bash src/engine/native/backend/cuda/scripts/persist_bench.sh
# Needs .cudadev/ as docs/cuda_backend.md builds it (bin/, lib/, llama8b/). ROUNDS (3), CONTEXTS
# ("512 4096"); every run has a short timeout, so a hung kernel costs seconds, not the call.
cd "$(dirname "$0")/../../../../../.."  # the repository root
export LD_LIBRARY_PATH=$PWD/.cudadev/lib:/usr/local/cuda/lib64
B=.cudadev/bin; OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name --format=csv,noheader
for P in 0 1; do
  echo "cuda_backend_test, DYN_CUDA_PERSIST=$P: $(DYN_CUDA_PERSIST=$P timeout 120 $B/cuda_backend_test --gtest_brief=1 2>&1 | grep -E "PASSED|FAILED" | head -2 | tr '\n' ' ')"
done
# ms per step and the token hash (equal in both modes: c52217800b211f32 at 512, 300afaab6b5af72b at 4096)
bench() { timeout 40 $B/dyn_cuda_bench --config .cudadev/llama8b --prompts "" --context $1 --steps 100 --batches 1 2>&1 | grep -E "^ +1 |rror" | awk '{print $2, $6}'; }
for r in $(seq ${ROUNDS:-3}); do
  for c in ${CONTEXTS:-512 4096}; do
    echo "context $c: default $(DYN_CUDA_PERSIST=0 bench $c) | persistent $(DYN_CUDA_PERSIST=1 bench $c)"
  done
done
for c in ${CONTEXTS:-512 4096}; do
  DYN_CUDA_GRAPHS=0 DYN_CUDA_PERSIST=1 DYN_CUDA_PERSIST_TRACE=1 timeout 60 $B/dyn_cuda_bench --config .cudadev/llama8b --prompts "" \
    --context $c --steps 1 --batches 1 > $OUT/trace_$c.txt 2>&1
  echo "trace at context $c: $OUT/trace_$c.txt ($(grep -c 'persistent kernel:' $OUT/trace_$c.txt) launches)"
done
