#!/usr/bin/env bash
# Install TRL into its own environment, ./.venv-bench, for benchmarks/e2e_step.py's baseline
# (benchmarks/trl_step.py runs there as a subprocess). Separate so that TRL and its
# dependencies (accelerate, datasets) never enter the training environment, ./.venv.
# torch and transformers are pinned to the versions of .venv (constraints/ci.txt), so both
# sides of the comparison run the same kernels.
#
#   tools/install_bench.sh            then: .venv/bin/python benchmarks/e2e_step.py
#
# Environment: PYTHON (default python3) picks the interpreter; DGRPO_BENCH_VENV (default
# ./.venv-bench) picks where it lives.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DGRPO_BENCH_VENV:-$repo/.venv-bench}"

if [[ ! -x "$venv/bin/python" ]]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade "pip>=24"
"$venv/bin/python" -m pip install --quiet "torch==2.13.0" "transformers==5.19.0" "trl==1.16.0"
"$venv/bin/python" -c "import trl" >/dev/null
echo "trl installed in $venv"
