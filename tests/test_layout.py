"""The tree reads as the pipeline and imports run one way: python -m pytest tests/test_layout.py -q

Layers, lowest first: errors and faults; results (the run store and what is
computed from runs); core and remote (shared machinery); stages; demo; cli.
A module imports only from its own layer or below, and the import graph of
every ``ablate`` import (at module level or inside a function) has no cycle.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ablate"
LAYERS = {"errors": 0, "faults": 0, "bench": 4, "results": 1, "core": 2, "remote": 2, "stages": 3, "demo": 4, "cli": 5,
          "__main__": 6}
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every ablate module ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ablate"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ablate"))
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else -1


def test_imports_run_from_the_command_line_down_to_the_run_store():
    wrong = [f"{a} -> {b}" for a, targets in graph().items() for b in targets
             if layer(b) > layer(a) and not (a == "ablate" or b.startswith(a + "."))]
    assert not wrong, "imports against the layers: " + ", ".join(sorted(wrong))


def test_the_import_graph_has_no_cycle():
    edges = graph()
    # A package importing its own submodules (ablate.cli registering its command groups) is not a cycle.
    edges = {a: {b for b in targets if not b.startswith(a + ".")} for a, targets in edges.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_the_tree_names_the_pipeline():
    names = {module_name(p) for p in PACKAGE.rglob("*.py")}
    for stage in ("stage1_baseline_eval", "stage2_ablation_eval", "stage3_finetune", "stage4_post_ft_eval"):
        assert f"ablate.stages.{stage}" in names
        assert (PACKAGE / "stages" / f"{stage}.yaml").is_file()  # each stage beside its defaults
    assert "ablate.core.masks" in names and "ablate.results.rundir" in names


def test_no_module_is_too_long():
    long = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
