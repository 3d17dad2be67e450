"""The library's architecture, checked from the source: layers that import only downward, and no import cycle.

Every ``import`` counts, also one inside a function: a cycle or an upward import there is as hard for a reader to
follow as one at the top. ``LAYERS`` is the map a newcomer reads first: each module may import from its own layer
(without a cycle) and from the layers listed before it.
"""
import ast
from fnmatch import fnmatch
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[1] / "alignlib"

LAYERS = [  # lowest first
    ("core: models, decoding, scoring, data", ["alignlib", "alignlib.validate", "alignlib.utils", "alignlib.hub",
                                              "alignlib.models", "alignlib.data", "alignlib.logprobs",
                                              "alignlib.engine", "alignlib.engine.*", "alignlib.generation",
                                              "alignlib.prefix_cache", "alignlib.multiple_choice", "alignlib.rewards",
                                              "alignlib.evaluation", "alignlib.reward_backbones"]),
    ("training machinery", ["alignlib.training", "alignlib.training.distributed", "alignlib.training.protocol",
                            "alignlib.training.checkpoint", "alignlib.training.loop"]),
    ("trainers", ["alignlib.sft", "alignlib.ppo", "alignlib.rrhf", "alignlib.raft", "alignlib.reward_model",
                  "alignlib.feedback"]),
    ("trainers by name", ["alignlib.training.registry"]),
    ("methods built on trainers", ["alignlib.soups", "alignlib.cai", "alignlib.self_align", "alignlib.cai_sl_control",
                                    "alignlib.judge_validation"]),
    ("course tooling", ["alignlib.tiny_lab", "alignlib.summary", "alignlib.checks", "alignlib.checks.*"]),
    ("benchmarks and the command line", ["alignlib.bench", "alignlib.bench.*", "alignlib.commands",
                                         "alignlib.commands.*", "alignlib.__main__"]),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The alignlib modules ``path`` imports, relative imports resolved, ``from pkg import module`` as the module."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "alignlib"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "alignlib":
                continue
            subs = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known}
            found |= subs or {target}
            if len(subs) < len(node.names):
                found.add(target)
    return {m for m in found if m in known and m != here}


def layer_of(module: str) -> int:
    for i, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch(module, p) for p in patterns):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_architecture.py")


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) for name, path in known.items()}


def test_every_module_has_a_layer():
    for name in modules():
        layer_of(name)


def upward_imports(g: dict[str, set[str]]) -> list[str]:
    return [f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
            for a, targets in g.items() for b in sorted(targets) if layer_of(b) > layer_of(a)]


def cycles(g: dict[str, set[str]]) -> list[str]:
    state, found = {}, []

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(g[node]):
            if state.get(nxt) == "open":
                found.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    return found


def test_no_module_imports_from_a_higher_layer():
    assert not upward_imports(graph()), "imports against the layers:\n" + "\n".join(upward_imports(graph()))


def test_no_import_cycle():
    assert not cycles(graph()), "import cycles:\n" + "\n".join(cycles(graph()))


def test_the_checks_can_fail():
    """A planted upward import and a planted cycle are found; relative imports are resolved."""
    g = graph()
    assert "alignlib.training.loop" in g["alignlib.commands.run"]
    assert "alignlib.training.distributed" in g["alignlib.ppo"]
    planted = {**g, "alignlib.utils": g["alignlib.utils"] | {"alignlib.commands.cli"}}
    assert any(line.startswith("alignlib.utils ") for line in upward_imports(planted))
    planted = {**g, "alignlib.training.distributed": g["alignlib.training.distributed"] | {"alignlib.ppo"}}
    assert any("alignlib.ppo" in c and "alignlib.training.distributed" in c for c in cycles(planted))
