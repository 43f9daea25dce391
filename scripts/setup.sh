#!/usr/bin/env bash
# Install ard_sql and everything its build, tests and benchmarks need, on a fresh machine.
# Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first, exactly this CPU build: any other torch requirement pulls gigabytes of CUDA packages.
$PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e ".[test,sbi]"
# pylick (reference code for the Lick tests) pins astropy<6, which hats/lsdb cannot use.
$PY -m pip install -q --no-deps "pylick==1.0.2"
