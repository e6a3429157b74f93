"""The package layout keeps its promises: imports run one way (configs -> molmo_jax ->
data_pipelines), no module imports itself in a circle even through imports inside functions,
and every command line named in the README answers --help.

Imports are read from the source (ast), module-level and function-local alike, so an import
moved into a function to dodge a cycle still counts as an edge of the graph.
"""
import ast
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("configs", "molmo_jax", "data_pipelines", "launch")
# Which package may import which (DESIGN.md: configs -> molmo_jax -> data_pipelines; launch starts runs).
ALLOWED = {"configs": {"configs", "molmo_jax", "data_pipelines"},
           "molmo_jax": {"molmo_jax", "data_pipelines"},
           "data_pipelines": {"data_pipelines"},
           "launch": {"launch", "molmo_jax"}}
# The documented command lines (README, docs/): each must answer --help with exit status 0.
COMMANDS = ("molmo_jax.predict", "molmo_jax.serve", "molmo_jax.evaluate", "molmo_jax.export",
            "molmo_jax.import_hf", "molmo_jax.train", "molmo_jax.demo", "molmo_jax.evaluation.score",
            "molmo_jax.tools.logits", "molmo_jax.tools.aot", "data_pipelines.preprocess", "data_pipelines.download",
            "data_pipelines.sources.custom", "data_pipelines.tfds.builders")
# absl's --help prints the flags and exits 1 by its own convention.
ABSL_COMMANDS = ("molmo_jax.train",)


def module_files():
    out = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imported_modules(name: str, path: pathlib.Path, known) -> set:
    """Internal modules `name` imports anywhere in its file (the most specific known module of each)."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            for i in range(len(parts), 0, -1):
                candidate = ".".join(parts[:i])
                if candidate in known:
                    found.add(candidate)
                    break
    found.discard(name)
    return found


@pytest.fixture(scope="module")
def graph():
    files = module_files()
    return {name: imported_modules(name, path, files) for name, path in files.items()}


def test_imports_run_one_way(graph):
    wrong = [f"{m} imports {t}" for m, targets in graph.items() for t in targets
             if t.split(".")[0] not in ALLOWED[m.split(".")[0]]]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_even_through_function_local_imports(graph):
    """Tarjan's strongly connected components; a package's __init__ importing its own
    submodules is not a cycle of concern, but none of ours does."""
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_top_level_of_molmo_jax_holds_only_command_lines():
    """molmo_jax/*.py are the commands a user types (python -m molmo_jax.X); libraries live in
    the subpackages under other names, so a command and its library are never namesakes."""
    top = sorted(p.stem for p in (REPO / "molmo_jax").glob("*.py") if p.stem != "__init__")
    libraries = {p.stem for p in (REPO / "molmo_jax").rglob("*.py") if p.parent != REPO / "molmo_jax"}
    for name in top:
        source = (REPO / "molmo_jax" / f"{name}.py").read_text()
        assert "def main(" in source and '__name__ == "__main__"' in source, f"molmo_jax/{name}.py is not a command"
        assert name not in libraries, f"molmo_jax/{name}.py shares its name with a library module"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_documented_command_answers_help(command):
    p = subprocess.run([sys.executable, "-m", command, "--help"], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode in ((0, 1) if command in ABSL_COMMANDS else (0,)), out[-3000:]
    assert "Traceback" not in out and "--" in out, out[-3000:]  # argparse's usage or absl's flag list
