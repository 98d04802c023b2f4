"""x2jax.data modules import each other without cycles, and each imports on its own."""

import ast
import json
import pathlib
import subprocess
import sys

import pytest

DATA = pathlib.Path(__file__).resolve().parents[1] / "x2jax" / "data"
MODULES = sorted(p.stem for p in DATA.glob("*.py") if p.stem != "__init__")
PACKAGE = "x2jax.data"


def _data_imports(module: str, *, top_level_only: bool) -> set[str]:
    """x2jax.data modules that ``module`` imports (all imports, or only module-level ones)."""
    tree = ast.parse((DATA / f"{module}.py").read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module == PACKAGE:
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE + "."):
            found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[2] for a in node.names if a.name.startswith(PACKAGE + "."))
    unknown = found - set(MODULES)
    assert not unknown, f"{module} imports unknown x2jax.data modules {unknown}"
    return found - {module}


def _closure(module: str, graph: dict[str, set[str]]) -> set[str]:
    seen, todo = {module}, [module]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_no_import_cycle_among_data_modules():
    # Function-level (lazy) imports count too: a cycle through one is still a cycle.
    graph = {m: _data_imports(m, top_level_only=False) for m in MODULES}
    for m in MODULES:
        for dep in graph[m]:
            assert m not in _closure(dep, graph), f"import cycle: {m} -> {dep} -> ... -> {m}"


_PROBE = """
import json, sys, types, pathlib
import x2jax
pkg = types.ModuleType("x2jax.data")  # the package without its __init__: only what {m} pulls in
pkg.__path__ = [str(pathlib.Path(x2jax.__file__).parent / "data")]
sys.modules["x2jax.data"] = pkg
import importlib
importlib.import_module("x2jax.data.{m}")
print(json.dumps(sorted(k.split(".")[2] for k in sys.modules if k.startswith("x2jax.data."))))
"""


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_first_in_a_fresh_interpreter(module):
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(m=module)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    graph = {m: _data_imports(m, top_level_only=True) for m in MODULES}
    assert loaded == _closure(module, graph), f"{module} loaded {sorted(loaded)}"


def test_package_imports_in_a_fresh_interpreter():
    code = "import sys, x2jax.data; print(sorted(k for k in sys.modules if k.startswith('x2jax.data.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "x2jax.data.tfds_builders" not in out.stdout  # TFDS is imported only where it is used
