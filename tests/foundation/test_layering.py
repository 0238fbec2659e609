"""The package's import structure, read from the source (every import, function-level ones
included): arrows point down the layers, vLLM internals stay in two adapter files, and
``torch.distributed`` is touched only by the rank plumbing of ``parallel/``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_dgrpo"

# Lowest first; a module may import its own layer and the layers below it (and "data" only
# where listed). Modules not in a package below sit at the top (commands) and may import
# anything but testing/.
BASE = {"megatron_dgrpo", "megatron_dgrpo.config", "megatron_dgrpo.errors",
        "megatron_dgrpo.outputs", "megatron_dgrpo.parallel.collectives"}
LAYERS = ["algorithms", "parallel", "models", "rollout", "train"]
MAY_IMPORT_DATA = {"train"}
TOP = {"cli", "quickstart", "experiment", "experiment_report", "recipe", "eval_cli", "report",
       "launch", "testing"}
VLLM_ADAPTERS = {"megatron_dgrpo.rollout.vllm_engine", "megatron_dgrpo.rollout.vllm_worker"}
DISTRIBUTED = {"megatron_dgrpo.parallel.collectives", "megatron_dgrpo.parallel.launch"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return found


MODULES = {_module_name(path): _imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> str:
    if module in BASE:
        return "base"
    return module.split(".")[1]


def _allowed(importer: str) -> set[str] | None:
    layer = _layer(importer)
    if layer == "base":
        return {"base"}
    if layer == "data":
        return {"base", "data"}
    if layer in LAYERS:
        below = LAYERS[:LAYERS.index(layer) + 1]
        return {"base", *below, *({"data"} if layer in MAY_IMPORT_DATA else ())}
    assert layer in TOP, f"{importer} is in no known layer: add it to the test's map"
    return None  # top-level commands may import any layer


def _package_imports(imports: set[str]) -> set[str]:
    """The package modules among ``imports`` (names of imported objects resolved away)."""
    return {name for name in imports if name in MODULES}


def test_imports_point_down_the_layers():
    violations = []
    for module, imports in MODULES.items():
        allowed = _allowed(module)
        for target in _package_imports(imports):
            if _layer(target) == "testing" and _layer(module) != "testing":
                violations.append(f"{module} -> {target} (shipped code imports testing/)")
            elif allowed is not None and _layer(target) not in allowed:
                violations.append(f"{module} ({_layer(module)}) -> {target} ({_layer(target)})")
    assert not violations, "upward imports:\n" + "\n".join(sorted(violations))


@pytest.mark.parametrize("prefix, owners", [("vllm", VLLM_ADAPTERS),
                                            ("torch.distributed", DISTRIBUTED)])
def test_runtime_internals_stay_in_their_adapters(prefix, owners):
    users = sorted(module for module, imports in MODULES.items()
                   if any(name == prefix or name.startswith(prefix + ".") for name in imports))
    assert set(users) <= owners, f"{prefix} imported outside {sorted(owners)}: {users}"


def test_the_layer_map_knows_every_module():
    # The checks above would silently pass modules they do not classify.
    for module in MODULES:
        _allowed(module)
    assert {_layer(m) for m in MODULES} >= set(LAYERS) | {"data", "base"}
