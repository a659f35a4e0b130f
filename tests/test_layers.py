"""The layer contract of docs/architecture.md, read from the source with `ast`: imports
run one way (a module imports from its own layer or below; packages side by side in a
layer never import each other), there is no import circle, and an import inside a
function reaches a project module only with a `# why` comment saying what it keeps out
of a light command (torch, matplotlib, fastapi, transformers)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# lowest first; the packages of one layer sit side by side and must not import each other
LAYERS: list[tuple[str, ...]] = [
    ("core",),
    ("profiles",),
    ("sim", "runtime"),
    ("server", "profiles.measure"),
    ("experiments",),
    ("twin",),
    ("cli",),
]
PACKAGES = sorted({name.split(".")[0] for layer in LAYERS for name in layer})
# Files exempt from the `# why` rule while other work changes them (none now).
WHY_PENDING: set[str] = set()


def module_files() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(p for p in parts if p != "__init__")] = path
    return out


MODULES = module_files()


def unit_of(module: str) -> str:
    """The package (or sub-package) of LAYERS a module belongs to: the longest prefix."""
    names = [n for layer in LAYERS for n in layer if module == n or module.startswith(n + ".")]
    return max(names, key=len)


def layer_of(unit: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if unit in layer)


class Imports(ast.NodeVisitor):
    """Project modules a file imports: (target, line, inside a function, has a # why)."""

    def __init__(self, module: str, source: str) -> None:
        self.module, self.lines, self.depth = module, source.splitlines(), 0
        self.found: list[tuple[str, int, bool, bool]] = []

    def visit_FunctionDef(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in node.orelse:   # annotations only: no import at run time
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:   # relative: from the importing module's package
            pkg = self.module.split(".")[: -node.level] if not MODULES[self.module].name == "__init__.py" \
                else self.module.split(".")[: len(self.module.split(".")) - node.level + 1]
            base = ".".join([*pkg, base] if base else pkg)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self.add(sub if sub in MODULES else base, node)

    def add(self, target: str, node: ast.stmt) -> None:
        if target.split(".")[0] not in PACKAGES:
            return
        while target not in MODULES and "." in target:
            target = target.rsplit(".", 1)[0]
        around = self.lines[max(0, node.lineno - 2): node.end_lineno]
        why = any("# why" in line for line in around)
        self.found.append((target, node.lineno, self.depth > 0, why))


def all_imports() -> dict[str, list[tuple[str, int, bool, bool]]]:
    out = {}
    for module, path in MODULES.items():
        v = Imports(module, path.read_text())
        v.visit(ast.parse(path.read_text(), str(path)))
        out[module] = v.found
    return out


IMPORTS = all_imports()


def where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(ROOT)}:{line}"


def test_every_project_module_has_a_layer():
    assert {"core.scheduler", "runtime.driver", "profiles.measure.profiler", "twin.validate.run",
            "cli.main", "server.app", "experiments.runner", "experiments.errors", "experiments.expand",
            "experiments.task_runner", "runtime.batch_meta", "server.intake", "cli.errors"} <= set(MODULES)
    for module in MODULES:
        assert unit_of(module)


def test_imports_run_one_way_and_side_by_side_packages_stay_apart():
    bad = []
    for module, found in IMPORTS.items():
        unit = unit_of(module)
        for target, line, _, _ in found:
            other = unit_of(target)
            if other == unit:
                continue
            if layer_of(other) >= layer_of(unit):
                bad.append(f"{where(module, line)}: {unit} imports {target} ({other}, "
                           f"{'the same layer' if layer_of(other) == layer_of(unit) else 'a higher layer'})")
    assert not bad, "\n".join(bad)


def test_no_import_circles():
    graph = {m: sorted({t for t, *_ in found if t != m}) for m, found in IMPORTS.items()}
    # Tarjan's strongly connected components, iteratively
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    circles = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                members = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    members.append(m)
                    if m == node:
                        break
                if len(members) > 1:
                    circles.append(sorted(members))
    assert not circles, circles


def test_function_level_imports_of_project_modules_say_why():
    bad = [f"{where(module, line)}: imports {target} inside a function without a `# why` comment"
           for module, found in IMPORTS.items() for target, line, in_function, why in found
           if in_function and not why and str(MODULES[module].relative_to(ROOT)) not in WHY_PENDING]
    assert not bad, "\n".join(bad)
