"""The package's shape: layers without cycles, and a core that names no method.

Every import counts, also the ones inside functions (a lazy import is still a dependency).
Package ``__init__`` files are aside: they only re-export. Modules import the module they use,
never the ``vitslim`` package itself, so that the graph below is the real one.
"""
from __future__ import annotations

import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "vitslim"

# lowest first; a module may import from its own layer or any lower one
LAYERS = [
    ["vitslim.errors", "vitslim._compat", "vitslim._version", "vitslim.io"],
    ["vitslim.kernels", "vitslim.tokens", "vitslim.families", "vitslim.budget", "vitslim.measure.macs",
     "vitslim.methods.base", "vitslim.patch"],
    ["vitslim.methods.*", "vitslim.measure.*", "vitslim.data", "vitslim.calibration", "vitslim.dense.features",
     "vitslim.dense.visualize", "vitslim.dense.data", "vitslim.dense.metrics", "vitslim.dense.heads"],
    ["vitslim.models", "vitslim.dense.compare"],
    ["vitslim.train.*"],
    ["vitslim.zoo"],
    ["vitslim.export", "vitslim.export.*"],
    ["vitslim.autosearch_tasks"],
    ["vitslim.autosearch"],
    ["vitslim.cli_common"],
    ["vitslim.cli_segment"],
    ["vitslim.cli", "vitslim.__main__"],
]
CORE = ["vitslim.patch", "vitslim.tokens", "vitslim.kernels", "vitslim.families", "vitslim.budget",
        "vitslim.methods.base"]


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: pathlib.Path, known: set[str]) -> set[str]:
    """The vitslim modules a file imports, anywhere in it (``from pkg import sub`` resolved to pkg.sub)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("vitslim"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vitslim"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, known) - {name} for name, path in modules.items()
            if path.name != "__init__.py"}


def _layer(module: str) -> int:
    for i, names in enumerate(LAYERS):
        for pattern in names:
            if module == pattern or (pattern.endswith(".*") and module.startswith(pattern[:-1])):
                return i
    raise AssertionError(f"{module} is in no layer of tests/test_layering.py: add it")


def _packages() -> set[str]:
    return {_module_name(p) for p in PACKAGE.rglob("__init__.py")}


def test_every_module_has_a_layer_and_imports_modules_not_packages():
    packages = _packages()
    for module, targets in _graph().items():
        _layer(module)
        via_package = sorted(t for t in targets if t in packages and t != "vitslim.measure")
        assert not via_package, f"{module} imports the package(s) {via_package}: import the module it uses"


def test_imports_go_down_the_layers():
    packages = _packages()
    upward = [f"{m} (layer {_layer(m)}) -> {t} (layer {_layer(t)})" for m, targets in _graph().items()
              for t in sorted(targets) if t not in packages and _layer(t) > _layer(m)]
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_no_import_cycles():
    imports = _graph()
    graph = {m: {t for t in ts if t in imports} for m, ts in imports.items()}
    seen: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if seen.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in seen:
                visit(nxt, path + [nxt])
        seen[node] = 2

    for node in sorted(graph):
        if node not in seen:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("module", CORE)
def test_the_core_names_no_method(module):
    import vitslim

    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    lines = path.read_text().splitlines()
    for node in ast.walk(ast.parse(path.read_text())):  # a method's name in prose is fine; in code it is not
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            for i in range(body[0].lineno - 1, body[0].end_lineno):
                lines[i] = ""
    code = "\n".join(line.split("#", 1)[0] for line in lines).lower()
    if module == "vitslim.methods.base":  # the registry lists the built-in modules to import
        code = code.replace(code.split("_builtin = (", 1)[1].split(")", 1)[0], "")
    named = [m for m in vitslim.methods() if re.search(rf"\b{m}\b", code)]
    assert not named, f"{module} names methods {named}"


def test_the_engine_reads_no_method_attribute_by_name():
    engine = (PACKAGE / "train" / "engine.py").read_text()
    tree = ast.parse(engine)
    lookups = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") in
               ("getattr", "hasattr") and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
               and str(node.args[1].value).startswith("vitslim")]
    assert not lookups, "the engine looks method behaviour up by attribute name"
    assert "vitslim_lr_scale" not in engine and "vitslim_set_progress" not in engine


def test_token_state_keeps_no_single_method_field():
    import dataclasses

    from vitslim.tokens import TokenState

    assert {f.name for f in dataclasses.fields(TokenState)} == {
        "x", "num_prefix", "grid0", "grid", "size", "source", "prop_attn", "kernel", "aux", "scratch", "trace",
        "dropped", "block_source", "rope", "pos", "unplaced"}
    # dropped: filled by the shared keep_tokens, for top-k, EViT and SPViT alike; block_source: reset by the
    # core before every block, set by any reducer that merges and restores within one block (Prune-and-Merge);
    # rope/pos: the model family's rotary tables and each token's position, kept by the shared token ops;
    # unplaced: counted by the shared append_unplaced, carried across a pooling by the model family (PiT)


def test_every_hook_is_a_documented_method_with_a_default():
    from vitslim.methods.base import Method, Reducer

    for cls, hooks in ((Reducer, ["block_kernel", "before_block", "after_attn", "after_block", "after_model",
                                  "param_options", "set_progress", "plan"]),
                       (Method, ["prepare", "inference_options", "needs_teacher", "runs_on"])):
        for hook in hooks:
            assert callable(getattr(cls, hook)) and getattr(cls, hook).__doc__, f"{cls.__name__}.{hook}"
