#!/usr/bin/env bash
# Install NeMo-Run into its own environment, ./.venv-launch (the launcher; training runs in .venv
# or a container). Separate because every leptonai release that nemo-run needs pins
# anyio<=4.9 and starlette<1.0, which vLLM's dependencies (openai, starlette>=1.0.1) exclude,
# so pip cannot resolve nemo-run and vllm(-cpu) into one environment.
#
#   tools/install_launch.sh            then: .venv-launch/bin/python examples/nemo_run/dgrpo_recipe.py --help
#
# Environment: PYTHON (default python3) picks the interpreter; DGRPO_LAUNCH_VENV (default
# ./.venv-launch) picks where it lives.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DGRPO_LAUNCH_VENV:-$repo/.venv-launch}"

if [[ ! -x "$venv/bin/python" ]]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade "pip>=24"
# nemo-run 0.11.1 imports leptonai.api.v1, which leptonai 0.47 no longer has: pin 0.27.3.
"$venv/bin/python" -m pip install --quiet "nemo-run==0.11.1" "leptonai==0.27.3"
"$venv/bin/python" -c "import nemo_run" >/dev/null
echo "nemo-run installed in $venv"
