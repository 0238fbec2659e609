"""Nothing a user did not create in this run is unpickled, no repository code is trusted, and no
shell is started: an AST scan of the package, tools, benchmarks and examples.

Forbidden (each hit fails naming file:line, unless on :data:`ALLOWED` with its reason):

* unpickling: ``pickle`` / ``_pickle`` / ``cPickle`` / ``dill`` / ``cloudpickle`` ``load``,
  ``loads``, ``Unpickler``; ``joblib.load``; ``marshal.load(s)``; ``shelve.open``;
  ``pandas.read_pickle``; ``torch.jit.load``; ``torch.load`` without ``weights_only=True``;
  ``numpy.load`` with ``allow_pickle`` other than ``False``;
* ``trust_remote_code=`` anything but the literal ``False``;
* shells and code strings: ``os.system``, ``os.popen``, ``os.exec*``, ``os.spawn*``,
  ``subprocess.getoutput`` / ``getstatusoutput``, any ``shell=`` other than ``False``,
  ``eval`` / ``exec``; ``yaml.load`` / ``load_all`` / ``full_load`` / ``unsafe_load``;
* the string ``VLLM_ALLOW_INSECURE_SERIALIZATION`` (vLLM's pickle-based RPC).

Considered and allowed everywhere: ``torch.distributed`` object collectives and
``multiprocessing`` queues (they unpickle what ranks / children of this same run pickled),
``subprocess`` with an argument list (no shell: a path is one argument, never parsed).
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("megatron_dgrpo", "tools", "benchmarks", "examples")

# (file relative to the repository, what) -> why it is safe
ALLOWED = {
    ("megatron_dgrpo/parallel/launch.py", "pickle.loads"):
        "the bytes its own spawned child pickled and sent through a multiprocessing queue "
        "(documented there), never a file",
    ("megatron_dgrpo/rollout/vllm_engine.py", "VLLM_ALLOW_INSECURE_SERIALIZATION"):
        "set only for vLLM's engine-core child that this process spawns: both ends of that "
        "local RPC are this program (refit and verification functions travel pickled)",
}

UNPICKLERS = {f"{module}.{name}" for module in ("pickle", "_pickle", "cPickle", "dill", "cloudpickle")
              for name in ("load", "loads", "Unpickler")}
ALWAYS_FORBIDDEN = UNPICKLERS | {
    "joblib.load", "marshal.load", "marshal.loads", "shelve.open", "pandas.read_pickle",
    "torch.jit.load", "os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput",
    "eval", "exec", "yaml.load", "yaml.load_all", "yaml.full_load", "yaml.unsafe_load",
    "yaml.unsafe_load_all", "yaml.full_load_all",
}
FORBIDDEN_PREFIXES = ("os.exec", "os.spawn", "os.posix_spawn")


def _is_literal(node: ast.AST | None, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


class _Scanner(ast.NodeVisitor):
    """Collects ``(line, what)`` for every forbidden use in one module."""

    def __init__(self) -> None:
        self.aliases: dict[str, str] = {}  # local name -> dotted origin
        self.hits: list[tuple[int, str]] = []

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.asname:
                self.aliases[alias.asname] = alias.name
            else:
                top = alias.name.split(".")[0]
                self.aliases[top] = top

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            self.aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"

    def _dotted(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = self._dotted(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    def visit_Call(self, node: ast.Call) -> None:
        name = self._dotted(node.func) or ""
        keywords = {k.arg: k.value for k in node.keywords if k.arg}
        if name in ALWAYS_FORBIDDEN or name.startswith(FORBIDDEN_PREFIXES):
            self.hits.append((node.lineno, name))
        elif name == "torch.load" and not _is_literal(keywords.get("weights_only"), True):
            self.hits.append((node.lineno, "torch.load without weights_only=True"))
        elif name in ("numpy.load", "np.load") and "allow_pickle" in keywords and not _is_literal(
                keywords["allow_pickle"], False):
            self.hits.append((node.lineno, "numpy.load with allow_pickle"))
        for key, what in (("trust_remote_code", "trust_remote_code"), ("shell", "shell=")):
            if key in keywords and not _is_literal(keywords[key], False):
                self.hits.append((node.lineno, what))
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and "VLLM_ALLOW_INSECURE_SERIALIZATION" in node.value:
            self.hits.append((node.lineno, "VLLM_ALLOW_INSECURE_SERIALIZATION"))


def scan_source(source: str) -> list[tuple[int, str]]:
    scanner = _Scanner()
    scanner.visit(ast.parse(source))
    return sorted(scanner.hits)


def _python_files() -> list[Path]:
    return sorted(p for folder in SCANNED for p in (ROOT / folder).rglob("*.py"))


def test_the_scanner_finds_every_forbidden_pattern():
    bad = textwrap.dedent("""
        import pickle, os, subprocess as sp, numpy as np, torch, yaml
        from pickle import loads as undo
        from dill import load
        pickle.load(f)
        undo(b)
        load(f)
        torch.load(path)
        torch.load(path, weights_only=False)
        np.load(path, allow_pickle=True)
        AutoModel.from_pretrained(path, trust_remote_code=True)
        LLM(path, trust_remote_code=config.trust)
        os.system("ls " + path)
        os.execvp("ls", ["ls"])
        sp.run(cmd, shell=True)
        eval(text)
        yaml.load(text)
        env = "VLLM_ALLOW_INSECURE_SERIALIZATION"
    """)
    assert [what for _, what in scan_source(bad)] == [
        "pickle.load", "pickle.loads", "dill.load", "torch.load without weights_only=True",
        "torch.load without weights_only=True", "numpy.load with allow_pickle", "trust_remote_code",
        "trust_remote_code", "os.system", "os.execvp", "shell=", "eval", "yaml.load",
        "VLLM_ALLOW_INSECURE_SERIALIZATION"]
    fine = textwrap.dedent("""
        import subprocess, torch, numpy, yaml
        torch.load(path, weights_only=True)
        numpy.load(path)
        numpy.load(path, allow_pickle=False)
        subprocess.run(["sbatch", "--parsable", path], check=True)
        subprocess.run(argv, shell=False)
        AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        yaml.safe_load(text)
        model.eval()
        dist.broadcast_object_list(box, src=0)
    """)
    assert scan_source(fine) == []


def test_no_forbidden_call_outside_the_allowlist():
    found, used = [], set()
    for path in _python_files():
        relative = path.relative_to(ROOT).as_posix()
        for line, what in scan_source(path.read_text(encoding="utf-8")):
            if (relative, what) in ALLOWED:
                used.add((relative, what))
            else:
                found.append(f"{relative}:{line}: {what}")
    assert not found, "forbidden calls (see this test's docstring):\n" + "\n".join(found)
    assert used == set(ALLOWED), f"stale allowlist entries: {sorted(set(ALLOWED) - used)}"
