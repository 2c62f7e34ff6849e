#!/usr/bin/env bash
# Runs every test: C++ unit and golden tests (ctest), then the integration tests that start real
# dyn servers and talk to them with real clients (pytest). Expects scripts/setup.sh to have run.
set -euo pipefail
cd "$(dirname "$0")/.."
ctest --test-dir build --output-on-failure -j"$(nproc)" --timeout 600
DYN_BIN="$PWD/build/apps/dyn/dyn" .venv/bin/python -m pytest -q -x tests/integration
./scripts/fuzz.sh 20
