"""The shape of the package, checked: every module of cpt/ sits in one layer of the README's layout
section, imports only from its own layer or the layers below it (module-level and function-level imports
alike), no two modules import each other round a cycle, no module is over 600 lines and no function over
80. The README is the one statement of the layers: this test reads them from it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "cpt"
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 600, 80


def modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def layers() -> list[tuple[str, list[str]]]:
    """The README's layers, lowest first: ``name  module, module.*, ...`` lines between the markers."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- layers:begin -->\n```text\n(.*?)```\n<!-- layers:end -->", text, re.S)
    assert block, "README.md: no layers block (<!-- layers:begin --> ... <!-- layers:end -->)"
    found = []
    for line in block.group(1).splitlines():
        name, _, rest = line.partition(" ")
        found.append((name, [m.strip() for m in rest.split(",") if m.strip()]))
    return found


def layer_of(module: str, table: list[tuple[str, list[str]]]) -> int | None:
    """Index of the layer whose most specific pattern matches ``module`` (``a.b.*``: a.b and below)."""
    best: tuple[int, int] | None = None  # (specificity, layer)
    for i, (_, patterns) in enumerate(table):
        for pat in patterns:
            base = pat[:-2] if pat.endswith(".*") else pat
            hit = module == base or (pat.endswith(".*") and module.startswith(base + "."))
            if hit and (best is None or len(base) > best[0]):
                best = (len(base), i)
    return None if best is None else best[1]


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The cpt modules ``module`` imports, anywhere in its file (inside functions too). ``from a import b``
    counts as importing a.b where that is a module, else a."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = {f"{target}.{a.name}" for a in node.names} & known
            out |= subs or ({target} & known)
    return out - {module}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(m, f, set(mods)) for m, f in mods.items()}


def test_every_module_has_a_layer_and_imports_only_downward():
    table, g = layers(), graph()
    unplaced = sorted(m for m in g if layer_of(m, table) is None)
    assert not unplaced, f"modules in no layer of README.md's layout section: {unplaced}"
    upward = sorted(f"{a} ({table[layer_of(a, table)][0]}) -> {b} ({table[layer_of(b, table)][0]})"
                    for a, targets in g.items() for b in targets if layer_of(b, table) > layer_of(a, table))
    assert not upward, "imports from a lower layer up:\n" + "\n".join(upward)


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``g``: its strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert not (found := cycles(graph())), f"import cycles: {found}"


def test_the_checks_catch_what_they_claim():
    """An upward import and a cycle in a made-up table and graph are found (the checks can fail)."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    table = [("low", ["cpt.a"]), ("high", ["cpt.b", "cpt.c.*"])]
    assert [layer_of(m, table) for m in ("cpt.a", "cpt.b", "cpt.c", "cpt.c.d", "cpt.e")] == [0, 1, 1, 1, None]
    assert layer_of("cpt.a", table) < layer_of("cpt.c.d", table)  # cpt.a -> cpt.c.d would be upward
    src = "def f():\n    from cpt.train import step\n    import cpt.model\n"
    tmp = ROOT / "tests" / "data"
    f = tmp / "_arch_probe.py"
    try:
        f.write_text(src)
        assert imports("cpt.x", f, {"cpt.train", "cpt.train.step", "cpt.model"}) == {"cpt.train.step", "cpt.model"}
    finally:
        f.unlink()


def test_no_module_or_function_too_long_to_hold():
    long = []
    for module, path in modules().items():
        src = path.read_text()
        if (n := len(src.splitlines())) > MAX_MODULE_LINES:
            long.append(f"{module}: {n} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if (n := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {n} lines")
    assert not long, (f"over {MAX_MODULE_LINES} lines a module or {MAX_FUNCTION_LINES} a function "
                      f"(split where the idea splits):\n" + "\n".join(long))
