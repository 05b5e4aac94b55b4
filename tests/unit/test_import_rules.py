"""The one-way imports docs/architecture.md promises, read from the source (function-local imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# package -> prefixes of modules it must never import
FORBIDDEN = {
    "megagpt/parallel": ("megagpt.model", "megagpt.train"),
    "megagpt/model": ("megagpt.train",),
    "megagpt": ("launcher", "tools", "tests", "bench"),
}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", FORBIDDEN)
def test_packages_import_only_downwards(package):
    banned = FORBIDDEN[package]
    broken = {
        f"{path.relative_to(REPO)} imports {name}"
        for path in sorted((REPO / package).rglob("*.py"))
        for name in imported_modules(path)
        if any(name == prefix or name.startswith(prefix + ".") for prefix in banned)
    }
    assert not broken, f"{package} may not import {banned} (docs/architecture.md): {sorted(broken)}"
