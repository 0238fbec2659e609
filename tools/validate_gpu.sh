#!/usr/bin/env bash
# GPU validation: the CUDA paths CI cannot reach. Run from the repository root on a machine
# with a CUDA GPU and the package installed (`pip install -e .[gpu,test]`), or with bare
# torch + pytest plus wheels in .whl/ (megatron-core and the pure-Python extras), which
# this script installs into a scratch directory without network.
#
#   tools/validate_gpu.sh [OUT_DIR]      # default runs/gpu-validation (or $OUT)
#
# Runs tests/gpu: Megatron on CUDA vs transformers, the fused loss, the trainer, and the
# FP8 loss checks (tests/gpu/test_fp8_loss_cuda.py: torch._scaled_mm on CUDA against the
# float64 product, the fused FP8 loss against the CPU FP8 loss and its documented error;
# they need compute capability >= 8.9, not Transformer Engine, and are skipped below it).
# Writes OUT_DIR/{environment.txt, pytest.txt, loss_memory_cuda.md} (the benchmark adds the
# fused FP8 loss's columns); exit status is pytest's.
set -uo pipefail
out=${1:-${OUT:-runs/gpu-validation}}
mkdir -p "$out"
python=${PYTHON:-python3}

if ! "$python" -c "import megatron.core" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/dgrpo-site .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/dgrpo-site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "megatron-core is not importable: pip install -e '.[gpu,test]' first" >&2
        exit 1
    fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$python" - <<'PY'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(),
      "compute capability %d.%d" % torch.cuda.get_device_capability())
for name in ("megatron.core", "transformer_engine", "vllm", "transformers"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as exc:  # noqa: BLE001
        print(name, "NOT AVAILABLE:", type(exc).__name__, str(exc)[:120])
PY
} 2>&1 | tee "$out/environment.txt"

"$python" -m pytest tests/gpu -m gpu -v -s -p no:cacheprovider 2>&1 | tee "$out/pytest.txt"
status=${PIPESTATUS[0]}

"$python" benchmarks/loss_memory_cuda.py "${@:2}" 2>&1 | tee "$out/loss_memory_cuda.md"
exit "$status"
