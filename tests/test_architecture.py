"""The house, read from the code: each layer imports only the layers below it, and no function is too long.

The layers, bottom to top (docs/architecture.md draws them):

0. base: errors, files, tokentext, progress, distributed, renamed; and plots/, which draws result objects
   it is handed and never imports an analysis
1. kernel/: knows no model, no lens, no analysis
2. model_access/: the one reader of the model
3. inputs/: tokens, data, caches and options, resolved
4. stacks: the residual stream cut into pieces, and entry labels
5. lenses/: the Lens protocol and every lens (training and fitting included)
6. analyses: lens, readout, attribution, patchscopes, evaluate/
7. demo/, cli/
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "tl_logitlens"
LAYERS = {
    "errors": 0,
    "files": 0,
    "tokentext": 0,
    "progress": 0,
    "distributed": 0,
    "renamed": 0,
    "plots": 0,
    "kernel": 1,
    "model_access": 2,
    "inputs": 3,
    "stacks": 4,
    "lenses": 5,
    "lens": 6,
    "readout": 6,
    "attribution": 6,
    "patchscopes": 6,
    "divergence": 6,
    "latent": 6,
    "audit": 6,
    "evaluate": 6,
    "demo": 7,
    "cli": 7,
}
MAX_FUNCTION_LINES = 80


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        yield path, parts


def _unit(parts):
    """The top-level unit (package or module) a module belongs to; ``None`` for the package's own __init__."""
    return None if parts[0] in ("__init__", "__main__") else parts[0]


def _imports(path, parts):
    """Top-level units this module imports, relative imports and ``tl_logitlens.x`` alike."""
    tree = ast.parse(path.read_text())
    package = list(parts[:-1]) if parts[-1] != "__init__" else list(parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = base + (node.module.split(".") if node.module else [])
                names = [a.name for a in node.names] if not target else [None]
                for name in names:
                    whole = target if name is None else [name]
                    if whole:
                        yield whole[0], node.lineno
            elif node.module and node.module.startswith("tl_logitlens."):
                yield node.module.split(".")[1], node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("tl_logitlens."):
                    yield alias.name.split(".")[1], node.lineno


def test_every_unit_has_a_layer():
    units = {_unit(parts) for _, parts in _modules()} - {None}
    assert units <= set(LAYERS), f"units without a layer: {sorted(units - set(LAYERS))}; add them to LAYERS"


def test_imports_only_go_down():
    wrong = []
    for path, parts in _modules():
        unit = _unit(parts)
        if unit is None:
            continue
        for target, line in _imports(path, parts):
            if target in LAYERS and target != unit and LAYERS[target] > LAYERS[unit]:
                wrong.append(
                    f"{path.relative_to(ROOT.parent)}:{line} {unit} (layer {LAYERS[unit]}) imports "
                    f"{target} (layer {LAYERS[target]})"
                )
    assert not wrong, "imports that go up a layer:\n" + "\n".join(wrong)


def test_no_import_circles_between_units_of_one_layer():
    edges = {}
    for path, parts in _modules():
        unit = _unit(parts)
        if unit is not None:
            edges.setdefault(unit, set()).update(t for t, _ in _imports(path, parts) if t in LAYERS and t != unit)
    for start in edges:
        seen, todo = set(), list(edges[start])
        while todo:
            node = todo.pop()
            assert node != start, f"{start} imports itself back through {sorted(seen)}"
            if node not in seen:
                seen.add(node)
                todo.extend(edges.get(node, ()))


@pytest.mark.parametrize("path", [p for p, _ in _modules()], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_function_over_80_lines(path):
    tree = ast.parse(path.read_text())
    long = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                body = body[1:]
            if body and node.end_lineno - body[0].lineno + 1 > MAX_FUNCTION_LINES:
                long.append(f"{node.name} ({node.end_lineno - body[0].lineno + 1} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines of code: {long}; split them along the data flow"
