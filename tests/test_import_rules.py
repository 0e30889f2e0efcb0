"""The packages import only downward (docs/ARCHITECTURE.md), read from the source with ast.

Floors, bottom up: ``shared`` (pure, numpy-only) <- ``device_app`` (no torch), ``edge_server``,
``export`` (may use ``edge_server``'s family loading) <- ``lab``. No import cycles between our
modules. Every import counts, also one inside a function: a lazy import still ties the floors.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("shared", "device_app", "edge_server", "export", "lab")
HEAVY = ("torch", "diffusers", "transformers", "optimum", "accelerate")

#: package -> the top-level names it must never import.
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "shared": ("device_app", "edge_server", "export", "lab", *HEAVY, "onnxruntime", "kivy", "websockets"),
    "device_app": ("edge_server", "export", "lab", *HEAVY),
    "edge_server": ("device_app", "export", "lab"),
    "export": ("device_app", "lab"),
    "lab": (),
}


@dataclass(frozen=True)
class Import:
    file: Path
    line: int
    module: str  # the dotted module imported (for ``from a import b``: ``a.b`` when b is a module of ours)


def module_name(file: Path, root: Path) -> str:
    parts = list(file.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve_relative(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(file: Path, root: Path) -> Iterator[Import]:
    """Every import statement of ``file`` (top level or nested), as absolute module names."""
    tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
    module = module_name(file, root)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(file, node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve_relative(module, node, file.name == "__init__.py") if node.level else (node.module or "")
            for alias in node.names:
                # ``from shared import handoff`` imports the module shared.handoff
                sub = f"{target}.{alias.name}"
                yield Import(file, node.lineno, sub if _is_module(sub, root) else target)


def _is_module(dotted: str, root: Path) -> bool:
    path = root.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def our_files(root: Path, packages: Iterable[str] = OURS) -> Iterator[Path]:
    for package in packages:
        yield from sorted((root / package).rglob("*.py"))


def violations(root: Path) -> list[str]:
    """Each forbidden import as ``file:line: <package> must not import <module>``."""
    found = []
    for package in OURS:
        for file in our_files(root, [package]):
            for imp in imports_of(file, root):
                top = imp.module.split(".")[0]
                if top in FORBIDDEN[package]:
                    found.append(f"{file.relative_to(root)}:{imp.line}: {package} must not import {imp.module}")
    return found


def cycles(root: Path) -> list[str]:
    """Import cycles between our modules, each as ``a -> b -> ... -> a`` with the first line of each edge."""
    graph: dict[str, dict[str, str]] = {}
    for file in our_files(root):
        name = module_name(file, root)
        edges = graph.setdefault(name, {})
        for imp in imports_of(file, root):
            if imp.module.split(".")[0] in OURS and imp.module != name and _is_module(imp.module, root):
                # a package's own __init__ importing its submodules is not a cycle through the package
                if name and imp.module.startswith(name + ".") and file.name == "__init__.py":
                    continue
                edges.setdefault(imp.module, f"{file.relative_to(root)}:{imp.line}")
    found: list[str] = []
    seen: set[frozenset[str]] = set()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, {}):
            if state.get(nxt) == 1:
                loop = stack[stack.index(nxt):] + [nxt]
                key = frozenset(loop)
                if key not in seen:
                    seen.add(key)
                    where = ", ".join(graph[a][b] for a, b in zip(loop, loop[1:], strict=False))
                    found.append(" -> ".join(loop) + f" ({where})")
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_packages_import_only_downward() -> None:
    assert violations(ROOT) == []


def test_no_import_cycles_between_our_modules() -> None:
    assert cycles(ROOT) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for package in OURS:
        (tmp_path / package).mkdir(exist_ok=True)
        (tmp_path / package / "__init__.py").touch()
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize(("file", "text", "expected"), [
    ("shared/bad.py", "import numpy\nfrom edge_server import family\n",
     "shared/bad.py:2: shared must not import edge_server"),
    ("device_app/bad.py", "def f():\n    import torch\n", "device_app/bad.py:2: device_app must not import torch"),
    ("device_app/bad.py", "from lab.demo import main\n", "device_app/bad.py:1: device_app must not import lab"),
    ("edge_server/bad.py", "from device_app.runtime import DeviceBundle\n",
     "edge_server/bad.py:1: edge_server must not import device_app"),
    ("export/bad.py", "import lab.simulator\n", "export/bad.py:1: export must not import lab"),
    ("shared/sub/bad.py", "from ...edge_server import family\n", "shared/sub/bad.py:1: shared must not import edge_server"),
])
def test_a_forbidden_import_in_a_new_module_is_named_with_its_file_and_line(
        tmp_path: Path, file: str, text: str, expected: str) -> None:
    root = _tree(tmp_path, {file: text, "shared/sub/__init__.py": ""})
    found = violations(root)
    assert len(found) == 1 and found[0].startswith(expected), found


def test_allowed_imports_are_not_flagged(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "device_app/ok.py": "import numpy\nfrom shared import errors\nimport onnxruntime\n",
        "export/ok.py": "from edge_server.family import load_family\nimport torch\n",
        "lab/ok.py": "import device_app, edge_server, export, shared\n",
        "shared/errors.py": "",
        "edge_server/family.py": "",
    })
    assert violations(root) == []


def test_a_cycle_is_found_and_named(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "device_app/a.py": "from device_app import b\n",
        "device_app/b.py": "def f():\n    import device_app.a\n",
    })
    found = cycles(root)
    assert len(found) == 1
    assert "device_app.a -> device_app.b -> device_app.a" in found[0] and "device_app/b.py:2" in found[0]
