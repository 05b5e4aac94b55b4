"""The installed commands ([project.scripts] in pyproject.toml) and the scripts in launcher/ and tools/ are the same
programs: every entry point names a callable in megagpt.cli, and every thin script calls one of them."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys

import pytest

from tests.conftest import REPO

# Scripts that keep their own code, for developers of a checkout, not installed: gpu_check drives the checkout's
# bench/ and tests/; gen_config_docs writes the checkout's docs/config.md.
NOT_INSTALLED = {"gpu_check.py", "gen_config_docs.py"}


def entry_points() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_entry_point_resolves_to_a_callable_in_the_package():
    scripts = entry_points()
    assert "megagpt-pretrain" in scripts
    for name, target in scripts.items():
        module, _, attribute = target.partition(":")
        assert module.startswith("megagpt.cli."), (name, target)
        assert callable(getattr(importlib.import_module(module), attribute)), (name, target)


def test_launcher_and_tools_are_thin_scripts_over_the_entry_points():
    targets = {target.partition(":")[0] for target in entry_points().values()}
    scripts = [REPO / "launcher/pretrain.py", *sorted((REPO / "tools").glob("*.py"))]
    for script in scripts:
        if script.name in NOT_INSTALLED:
            continue
        tree = ast.parse(script.read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert imported & targets, f"{script} calls no megagpt.cli entry point"
        functions = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.ClassDef)]
        assert not functions, f"{script} defines {[f.name for f in functions]}: its code belongs in megagpt/cli/"


def test_the_launcher_script_still_answers_as_before():
    result = subprocess.run(
        [sys.executable, str(REPO / "launcher/pretrain.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout and "--dry-run" in result.stdout
