#!/bin/bash
# One device call: dyn run (8B shape, dummy weights) + dyn bench ShareGPT 1000 x 256 at concurrency 1000,
# then the HF transformers floor. Usage (device tool, carry [".cudadev"]): bash src/engine/native/backend/cuda/scripts/serve_bench.sh
# Needs .cudadev/ as docs/cuda_backend.md builds it (bin/dyn, lib/, llama8b/, the ShareGPT file).
# Fits one 600 s call: each bench is cut at $BENCH_S (180 s), the HF floor at $HF_S (120 s).
# EXTRA_BODY='{"temperature": 0.8, "top_p": 0.95}' sends sampling fields with every request.
cd "$(dirname "$0")/../../../../../.."  # the repository root
D=.cudadev; M=$D/llama8b   # config.json (Llama-3.1-8B shape) + deepseek-v3 tokenizer (128000 base ids < 128256)
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
export LD_LIBRARY_PATH=$PWD/$D/lib:/usr/local/cuda/lib64
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.mem,driver_version --format=csv
ldd $D/bin/dyn | grep "not found"
# KV is bf16 (F32 before 2026-12-01 round 2): 32 layers x 2 x 8 heads x 128 x 2 B = 128 KiB/token, 2 MiB per 16-token block.
# BLOCKS=auto: the KV cache sized by --gpu-memory-utilization ${GMU:-0.9} instead of a block count.
KV="--num-kv-blocks ${BLOCKS:-27000}"; [ "$BLOCKS" = auto ] && KV="--gpu-memory-utilization ${GMU:-0.9}"
for SEQS in ${SEQS:-256 1024}; do
  $D/bin/dyn run --model $M --served-model-name llama8b --device cuda --load-format dummy \
    $KV --max-num-seqs $SEQS --max-num-batched-tokens 8192 --port 8000 \
    > $OUT/server_$SEQS.log 2>&1 &
  SPID=$!
  for i in $(seq 120); do curl -sf localhost:8000/v1/models >/dev/null && break; sleep 1; done
  grep -h "model:\|KV blocks\|ready" $OUT/server_$SEQS.log
  nvidia-smi --query-gpu=memory.used --format=csv,noheader
  timeout ${BENCH_S:-180} $D/bin/dyn bench --url http://127.0.0.1:8000 --model llama8b \
    --sharegpt $D/ShareGPT_V3_filtered_1000.json --tokenizer $M/tokenizer.json \
    --output-tokens 256 --concurrency 1000 --num-requests 1000 --no-progress --json $OUT/bench_$SEQS.json \
    ${EXTRA_BODY:+--extra-body "$EXTRA_BODY"} 2>&1 | tail -12
  kill $SPID; wait $SPID 2>/dev/null
done
[ -n "$NO_HF" ] || timeout ${HF_S:-120} env -u LD_LIBRARY_PATH python3 src/engine/native/backend/cuda/scripts/hf_floor.py $M/config.json 2>&1 | tail -8
