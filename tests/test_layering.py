"""The floors of the library follow the data path, and no import runs back up or in a circle.

Floors, lowest first: ``runtime`` and ``losses`` (pure functions) -> ``data`` and
``models`` -> ``parallel`` (mesh, sharding, the class-sharded head) ->
``evaluation`` -> ``train`` -> ``tpu`` (compiling the train step for a TPU
topology) and ``compare`` (loss comparisons over train's pieces) -> ``plan`` (the fit table of such a compile). A module may import its
own package and lower floors, never a higher one (function-level imports
included); module-level imports have no cycle. Read statically from the source, then checked in fresh interpreters.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "x2jax"
FLOORS = {"_extras": 0, "runtime": 0, "losses": 0, "data": 1, "models": 1, "parallel": 2, "evaluation": 3, "train": 4, "tpu": 5, "compare": 5, "plan": 6}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    rel = PACKAGE.parent / Path(*name.split("."))
    return rel.with_suffix(".py").is_file() or (rel / "__init__.py").is_file()


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported x2jax module, at module level?) for every import in ``path``.

    ``from pkg import sub`` imports the submodule ``pkg.sub`` (and runs ``pkg``'s
    ``__init__``, which is not counted as an edge of its own submodules).
    """
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    for node in tree.body:  # imports under a module-level `if`/`try` run at import too
        if isinstance(node, (ast.If, ast.Try)):
            top.update(id(n) for n in ast.walk(node))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}")]
            names = subs or [node.module]
        else:
            continue
        out += [(n, id(node) in top) for n in names if n == "x2jax" or n.startswith("x2jax.")]
    return out


def _graph():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        edges[name] = [(m, top) for m, top in _imports(path) if m in modules]
    return modules, edges


def _floor(module: str) -> int | None:
    parts = module.split(".")
    return FLOORS.get(parts[1]) if len(parts) > 1 else None


def test_every_subpackage_has_a_floor():
    packages = {p.name for p in PACKAGE.iterdir() if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"}
    packages = {p.removesuffix(".py") for p in packages} - {"__init__", "__pycache__"}
    assert packages <= set(FLOORS), f"no floor for {sorted(packages - set(FLOORS))}"


def test_no_import_from_a_lower_floor_to_a_higher_one():
    _, edges = _graph()
    up = [f"{a} -> {b}" for a, out in edges.items() for b, _ in out
          if _floor(a) is not None and _floor(b) is not None and _floor(b) > _floor(a)]
    assert not up, "imports that run up the floors:\n" + "\n".join(up)


def test_no_import_cycle_at_module_level():
    _, edges = _graph()
    top = {a: sorted({b for b, at_top in out if at_top and b != a}) for a, out in edges.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in top.get(node, []):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(top):
        if node not in state:
            visit(node, [node])
    assert not cycles, "module-level import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("package", ["x2jax.losses", "x2jax.data", "x2jax.models", "x2jax.parallel",
                                     "x2jax.evaluation"])
def test_importing_a_package_pulls_in_no_higher_floor(package):
    code = ("import sys; import " + package + "; "
            "print('\\n'.join(m for m in sys.modules if m.startswith('x2jax.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = out.stdout.split()
    floor = FLOORS[package.split(".")[1]]
    higher = [m for m in loaded if (_floor(m) or 0) > floor]
    assert not higher, f"import {package} loaded {higher}"
    assert package in loaded


def test_losses_import_without_flax_or_data_stacks():
    code = ("import sys; import x2jax.losses; "
            "print(sorted(m for m in ('flax', 'orbax', 'tensorflow_datasets', 'grain') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
