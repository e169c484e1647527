"""The layers import only downwards: core, interfaces, logins, stores, server."""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

PACKAGE = Path(__file__).resolve().parent.parent / "popserv"

#: What each layer may import at run time (imports for types only are free).
ALLOWED = {
    "core": {"core"},
    "interfaces": {"core"},
    "logins": {"core", "interfaces", "logins"},
    "stores": {"core", "interfaces", "logins", "stores"},
    "server": {"core", "interfaces", "logins", "stores", "server", "probe", "_version"},
    # A POP3 client that checks any server: none of popserv's own code, so
    # that it cannot share a mistake with the server it checks.
    "probe": {"probe"},
}


def layer_of(module: str) -> str | None:
    """``core`` for ``popserv.core.wire``; None outside popserv or for popserv itself."""
    parts = module.split(".")
    return parts[1] if parts[0] == "popserv" and len(parts) > 1 else None


def runtime_imports(tree: ast.AST) -> list[str]:
    """The popserv modules ``tree`` imports anywhere but in ``if TYPE_CHECKING:``."""
    found = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for other in node.orelse:
                found.extend(runtime_imports(other))
            continue
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "popserv":
                found.extend(f"popserv.{alias.name}" for alias in node.names)
            else:
                found.append(node.module)
        found.extend(runtime_imports(node))
    return [name for name in found if name.startswith("popserv.")]


class LayerTests(SynchronousTestCase):
    def test_imports_go_down(self) -> None:
        wrong = []
        for path in sorted(PACKAGE.rglob("*.py")):
            relative = path.relative_to(PACKAGE.parent).with_suffix("")
            module = ".".join(relative.parts)
            layer = layer_of(module)
            if layer not in ALLOWED:
                continue  # popserv/__init__.py and _version.py
            for imported in runtime_imports(ast.parse(path.read_text())):
                if layer_of(imported) not in ALLOWED[layer]:
                    wrong.append(f"{module} imports {imported}")
        self.assertEqual(wrong, [])

    def test_the_check_sees_imports(self) -> None:
        """The rule sees imports at the top and in functions, not those for types only."""
        tree = ast.parse(
            "from popserv.server import protocol\n"
            "if TYPE_CHECKING:\n    from popserv.stores import memory\n"
            "def f():\n    from popserv.logins import oauth\n"
        )
        self.assertEqual(runtime_imports(tree), ["popserv.server", "popserv.logins"])
