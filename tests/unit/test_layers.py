"""The layering contract: every module of ``src/pgtasks`` belongs to a room (a package, or a
few top-level modules) in a layer, and imports only from the layers below its own, or from
its own room. Imports inside functions and under ``TYPE_CHECKING`` count like any other, so
no cycle between rooms can hide there. docs/design.md draws the same map.

A new module must be placed in `LAYERS` (the test says so); a new package usually becomes a
room of its own in the layer where it belongs.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pgtasks

SRC = Path(pgtasks.__file__).resolve().parent

# Bottom to top. Each layer maps its rooms to the module names they hold: a name covers that
# module and, for a package, everything under it. `pgtasks` itself (the facade that
# re-exports the public API) is the top.
LAYERS: list[tuple[str, dict[str, tuple[str, ...]]]] = [
    (
        "basics",
        {
            "basics": (
                "pgtasks._options",
                "pgtasks._shared",
                "pgtasks._version",
                "pgtasks.context",
                "pgtasks.exceptions",
                "pgtasks.queues",
            )
        },
    ),
    ("serialization", {"serialization": ("pgtasks.serialization",)}),
    ("tasks", {"tasks": ("pgtasks.tasks", "pgtasks.hooks", "pgtasks.periodic")}),
    ("db", {"db": ("pgtasks.db",)}),
    ("client and admin", {"client": ("pgtasks.client",), "admin": ("pgtasks.admin",)}),
    ("worker", {"worker": ("pgtasks.worker",)}),
    ("app", {"app": ("pgtasks.app",)}),
    (
        "integrations",
        {"integrations": ("pgtasks.integrations",), "dashboard": ("pgtasks.dashboard",)},
    ),
    ("command line", {"cli": ("pgtasks.cli", "pgtasks.__main__")}),
    ("facade", {"facade": ("pgtasks",)}),
]


@dataclass(frozen=True)
class Room:
    layer: int
    layer_name: str
    name: str


@dataclass(frozen=True)
class Import:
    target: str  # a module of pgtasks
    line: int
    where: str  # "", " inside a function", " under TYPE_CHECKING"


def module_name(path: Path) -> str:
    parts = ["pgtasks", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def room_of(module: str) -> Room | None:
    best: tuple[int, Room] | None = None
    for index, (layer_name, rooms) in enumerate(LAYERS):
        for room, names in rooms.items():
            for name in names:
                covers = module == name or (name != "pgtasks" and module.startswith(name + "."))
                if covers and (best is None or len(name) > best[0]):
                    best = (len(name), Room(index, layer_name, room))
    return best[1] if best else None


class _Imports(ast.NodeVisitor):
    """Every import of a pgtasks module in one source file, wherever it is."""

    def __init__(self, module: str, is_package: bool, known: set[str]) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.known = known
        self.found: list[Import] = []
        self._where: list[str] = []

    def _add(self, target: str, node: ast.AST) -> None:
        if target == "pgtasks" or target.startswith("pgtasks."):
            where = self._where[-1] if self._where else ""
            self.found.append(Import(target, getattr(node, "lineno", 0), where))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            parts = self.package.split(".")
            base = ".".join(parts[: len(parts) - (node.level - 1)])
            source = f"{base}.{node.module}" if node.module else base
        else:
            source = node.module or ""
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            self._add(submodule if submodule in self.known else source, node)

    def visit_Call(self, node: ast.Call) -> None:
        # importlib.import_module("pgtasks.x"), importlib.resources.files("pgtasks.x")
        name = ast.unparse(node.func)
        if name.startswith("importlib.") and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                self._add(first.value, node)
        self.generic_visit(node)

    def _inside(self, where: str, node: ast.AST) -> None:
        self._where.append(where)
        self.generic_visit(node)
        self._where.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._inside(self._where[-1] if self._where else " inside a function", node)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._inside(self._where[-1] if self._where else " inside a function", node)

    def visit_If(self, node: ast.If) -> None:
        if "TYPE_CHECKING" in ast.unparse(node.test):
            self._where.append(" under TYPE_CHECKING")
            for child in node.body:
                self.visit(child)
            self._where.pop()
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)


def imports_of(module: str, source: str, *, is_package: bool, known: set[str]) -> list[Import]:
    visitor = _Imports(module, is_package, known)
    visitor.visit(ast.parse(source))
    return visitor.found


def violations(module: str, imports: list[Import]) -> list[str]:
    """What breaks the rule in these imports of ``module``, one readable line each."""
    own = room_of(module)
    assert own is not None, module
    below = ", ".join(name for name, _ in LAYERS[: own.layer]) or "none: it imports nothing"
    found = []
    for imp in imports:
        target = room_of(imp.target)
        if target is None:
            found.append(f"{module} imports {imp.target}, which is in no layer (add it)")
            continue
        if target.layer < own.layer or target.name == own.name:
            continue
        found.append(
            f"{module} (layer '{own.layer_name}', room '{own.name}') imports {imp.target} "
            f"(layer '{target.layer_name}', room '{target.name}') at line {imp.line}"
            f"{imp.where}: a module may import only from its own room or from the layers "
            f"below its own ({below})"
        )
    return found


def test_every_module_is_in_a_layer() -> None:
    unplaced = [m for m in source_modules() if room_of(m) is None]
    assert unplaced == [], f"place these modules in LAYERS (tests/unit/test_layers.py): {unplaced}"


def test_every_room_of_the_map_exists() -> None:
    modules = source_modules()
    stale = [
        name
        for _, rooms in LAYERS
        for names in rooms.values()
        for name in names
        if not any(m == name or m.startswith(name + ".") for m in modules)
    ]
    assert stale == [], f"LAYERS names modules that do not exist: {stale}"


def test_modules_import_only_downward() -> None:
    modules = source_modules()
    known = set(modules)
    found = []
    for module, path in modules.items():
        imports = imports_of(
            module,
            path.read_text(encoding="utf-8"),
            is_package=path.name == "__init__.py",
            known=known,
        )
        found += violations(module, imports)
    assert found == [], "upward imports:\n" + "\n".join(found)


def test_a_hidden_upward_import_is_caught() -> None:
    """The contract sees imports under TYPE_CHECKING and inside functions, and says where."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "from ..serialization import envelope\n"
        "if TYPE_CHECKING:\n"
        "    from ..app import App\n"
        "def later() -> None:\n"
        "    from ..worker import Worker\n"
        "    import pgtasks.db.jobs\n"
    )
    known = set(source_modules())
    imports = imports_of("pgtasks.tasks.task", source, is_package=False, known=known)
    assert [(i.target, i.where) for i in imports] == [
        ("pgtasks.serialization.envelope", ""),
        ("pgtasks.app", " under TYPE_CHECKING"),
        ("pgtasks.worker", " inside a function"),
        ("pgtasks.db.jobs", " inside a function"),
    ]
    found = violations("pgtasks.tasks.task", imports)
    assert len(found) == 3
    assert found[0].startswith(
        "pgtasks.tasks.task (layer 'tasks', room 'tasks') imports pgtasks.app "
        "(layer 'app', room 'app') at line 4 under TYPE_CHECKING: a module may import only "
        "from its own room or from the layers below its own (basics, serialization)"
    )


def test_rooms_of_one_layer_do_not_import_each_other() -> None:
    imports = [Import("pgtasks.admin.dead_letters", 3, "")]
    assert violations("pgtasks.client.enqueue", imports) != []
    assert violations("pgtasks.client.enqueue", [Import("pgtasks.client.jobs", 3, "")]) == []
