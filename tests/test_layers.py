"""The import structure of qstar_rl (docs/design.md section 3): imports point inward only, with no cycle, and
the math in qstar_rl/core needs torch alone."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "qstar_rl"
LAYERS = [
    ["qstar_rl.core"],  # the method's math: torch only
    ["qstar_rl.config", "qstar_rl.flops", "qstar_rl.faults"],  # typed configs; FLOP counting; fault injection
    ["qstar_rl.corpus", "qstar_rl.model"],  # offline corpora; ThinkingLM
    ["qstar_rl.loading", "qstar_rl.data", "qstar_rl.rollout", "qstar_rl.engine"],  # loading, windows, DeepSpeed
    ["qstar_rl.learner", "qstar_rl.checkpoint"],  # the train step; checkpoints
    ["qstar_rl.rundir", "qstar_rl.metrics", "qstar_rl.export", "qstar_rl.generate", "qstar_rl.eval"],
    ["qstar_rl.report", "qstar_rl.checks"],
    ["qstar_rl.train", "qstar_rl.ray_workers", "qstar_rl.experiment"],  # entry points and actors
    ["qstar_rl.ray_train", "qstar_rl.cli"],
]
"""Each module may import modules of its own layer or below, never above."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    for index, members in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members):
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to docs/design.md)")


def import_graph() -> dict[str, set[str]]:
    """module -> the qstar_rl modules it imports (anywhere in the file, including function bodies)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        imports = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qstar_rl"):
                names = [f"qstar_rl.{a.name}" for a in node.names] if node.module == "qstar_rl" else [node.module]
                imports.update(names)
            elif isinstance(node, ast.Import):
                imports.update(a.name for a in node.names if a.name.startswith("qstar_rl"))
        graph[module_name(path)] = imports - {module_name(path)}
    return graph


def test_every_import_points_to_the_same_layer_or_below():
    upward = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in import_graph().items()
        if module != "qstar_rl"
        for target in targets
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, "\n".join(upward)


def test_there_is_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return [*path, module, target]
            if target not in state and (cycle := visit(target, [*path, module])):
                return cycle
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [])
            assert cycle is None, " -> ".join(cycle)


def test_the_core_imports_torch_alone():
    probe = (
        "import sys, qstar_rl.core.attention, qstar_rl.core.layout, qstar_rl.core.losses, qstar_rl.core.mixing, "
        "qstar_rl.core.analysis; print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'transformers', 'deepspeed', 'ray', 'datasets', 'wandb', 'yaml'}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    for path in (PACKAGE / "core").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                for name in names:
                    top = name.split(".")[0]
                    assert top in {"torch", "math", "dataclasses", "typing", "collections", "__future__", "qstar_rl"}
                    assert not name.startswith("qstar_rl") or name.startswith("qstar_rl.core"), (path, name)
