"""The code's hygiene: snakefmt formatting, `snakemake --lint` without findings, ruff on the Python."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

BIN = Path(sys.executable).parent


def test_snakefmt_check():
    files = ["Snakefile", *sorted(str(p.relative_to(REPO)) for p in (REPO / "workflow" / "rules").glob("*.smk"))]
    proc = subprocess.run([str(BIN / "snakefmt"), "--check", *files], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_snakemake_lint_has_no_findings(tmp_path):
    proc = subprocess.run(
        [str(BIN / "snakemake"), "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
         "--configfile", str(REPO / "config" / "config.yaml"), "--lint"],
        capture_output=True, text=True,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Congratulations" in out, out


def test_python_lint_is_clean():
    """ruff's pyflakes rules (pyproject.toml [tool.ruff]): unused imports and variables, undefined names."""
    proc = subprocess.run([str(BIN / "ruff"), "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------------- architecture

SRC = REPO / "src"
# docs/architecture.md's layers, left to right; a module may import from its own layer or one further left
LAYERS = [("types", "runtime", "declared_settings"), ("io",), ("demo",), ("cohort",), ("preprocess",), ("models",),
          ("embed",), ("analysis",), ("demo.truth",), ("report",), ("config", "logs", "cli")]
MAX_LINES = 450


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the cohortlens modules it imports, at module level or inside a function (lazy imports count)."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                candidates = [base, *(f"{base}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            targets |= {c for c in candidates if c in modules and c != name}
        graph[name] = targets
    return graph


def _layer(module: str) -> int | None:
    rest = module.removeprefix("cohortlens.")
    best = None
    for i, names in enumerate(LAYERS):
        for n in names:
            if rest == n or rest.startswith(n + "."):
                # the most specific name wins (demo.truth over demo)
                if best is None or len(n) > best[1]:
                    best = (i, len(n))
    return None if best is None else best[0]


def test_no_import_cycles():
    graph = _import_graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_imports_follow_the_layers():
    graph = _import_graph()
    upward = []
    for module, targets in graph.items():
        for target in targets:
            a, b = _layer(module), _layer(target)
            if a is not None and b is not None and b > a:
                upward.append(f"{module} -> {target}")
    assert not upward, upward
    assert all(_layer(m) is not None for m in graph if m != "cohortlens"), [m for m in graph if _layer(m) is None]


def test_no_module_over_the_size_limit():
    long = {_module_name(p): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
