"""The import graph: every module imports on its own (no circle hides behind an import order), and imports run one
way, from the rooms above to the rooms below:

    launcher/, tools/, tests/     entry points and tests: nothing in megagpt imports them
    train/, inference, hf, ...    the run; may import everything below
    model/, parallel/, data/      never import train/
    config, presets               import no megagpt module but leaves (modules that import nothing of megagpt but
                                  megagpt.errors), e.g. data/spec.py and batch_rampup.py

A megagpt import inside a function must be listed in FUNCTION_LOCAL with the reason it is not at the top.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "megagpt"

# (importing module, imported module): why the import sits inside a function instead of at the top.
FUNCTION_LOCAL = {
    ("megagpt.hf", "megagpt.checkpoint.format"): "conversion machinery, loaded only when converting",
    ("megagpt.hf", "megagpt.checkpoint.paths"): "conversion machinery, loaded only when converting",
    ("megagpt.hf", "megagpt.checkpoint.offline"): "conversion machinery, loaded only when converting",
    ("megagpt.hf", "megagpt.data.tokenizer"): "the tokenizer files are needed only when writing an HF folder",
    ("megagpt.hf", "megagpt.config"): "conversion machinery, loaded only when converting",
    ("megagpt.hf", "megagpt.checkpoint.reshard"): "resharding pulls in the whole training stack; only for --tp/--pp",
    ("megagpt.train.run_folders", "megagpt.checkpoint.paths"): "only the lock check lists checkpoints",
}

# The command-line entry points parse their arguments before importing the library, so --help and a wrong flag
# answer at once, without importing torch; they import late as a rule.
LATE_IMPORTING_PACKAGE = "megagpt.cli."

# Modules config.py and presets.py may import besides each other must be leaves: they import nothing of megagpt but
# these (so nothing they pull in can import config back).
LEAF_MAY_IMPORT = {"megagpt.errors"}
NEVER_IMPORTED_BY_MEGAGPT = ("launcher", "tools", "tests", "bench")


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # the imported module (a submodule when `from package import submodule`)
    line: int
    function_local: bool
    type_checking: bool  # under `if TYPE_CHECKING:`: never runs


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _resolve(importer: str, node: ast.ImportFrom) -> list[str]:
    base = node.module or ""
    if node.level:  # relative: counted from the importer's package
        package = importer.split(".") if MODULES[importer].name == "__init__.py" else importer.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
    # `from megagpt.data import spec` imports the submodule megagpt.data.spec.
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def imports_of(name: str) -> list[Import]:
    tree = ast.parse(MODULES[name].read_text())
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool, type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                targets = _resolve(name, child)
            else:
                targets = []
            for target in dict.fromkeys(targets):
                found.append(Import(name, target, child.lineno, in_function, type_checking))
            guarded = isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)
            is_function = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, in_function or is_function, type_checking or guarded)

    visit(tree, False, False)
    return found


def megagpt_imports(name: str) -> list[Import]:
    return [i for i in imports_of(name) if i.target == "megagpt" or i.target.startswith("megagpt.")]


def in_room(module: str, *rooms: str) -> bool:
    return any(module == f"megagpt.{room}" or module.startswith(f"megagpt.{room}.") for room in rooms)


# ----------------------------------------------------------------------------------------------------------------
# Each module imported first, in an interpreter that has imported no megagpt module yet


_IMPORT_EACH_FIRST = """
import json, os, sys, traceback
import numpy, torch, yaml  # third-party libraries once, before forking; no megagpt module yet
assert not any(m == "megagpt" or m.startswith("megagpt.") for m in sys.modules)
failures = {}
for name in sys.argv[1:]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child imports one module first and reports a failure's last line through the pipe
        os.close(read)
        try:
            __import__(name)
            code = 0
        except BaseException:
            os.write(write, traceback.format_exc().strip().splitlines()[-1].encode())
            code = 1
        os._exit(code)
    os.close(write)
    message = b""
    while chunk := os.read(read, 65536):
        message += chunk
    os.close(read)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        failures[name] = message.decode() or f"exit status {status}"
print(json.dumps(failures))
"""


def test_every_module_imports_first_on_its_own():
    """A circle hidden by import order (config -> presets -> train.schedules -> config imported fine as long as
    config came first) fails here: each module is imported first in a fresh process forked from an interpreter
    that holds torch but no megagpt module."""
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH_FIRST, *MODULES],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    failures = json.loads(result.stdout.strip().splitlines()[-1])
    assert not failures, f"modules that fail when imported first: {failures}"


# ----------------------------------------------------------------------------------------------------------------
# Layering, read from the source


def test_config_and_presets_import_only_leaves():
    leaves_used = set()
    for name in ("megagpt.config", "megagpt.presets"):
        for imp in megagpt_imports(name):
            if imp.type_checking or imp.target in ("megagpt.config", "megagpt.presets"):
                continue
            assert not in_room(imp.target, "parallel", "model", "train"), f"{name}:{imp.line} imports {imp.target}"
            leaves_used.add(imp.target)
    assert not any(i.target == "megagpt.config" and not i.type_checking for i in megagpt_imports("megagpt.presets")), (
        "presets.py sits below config.py (config resolves presets), so it must not import config"
    )
    for leaf in sorted(leaves_used):
        above = {i.target for i in megagpt_imports(leaf) if not i.type_checking} - LEAF_MAY_IMPORT
        assert not above, f"{leaf} is imported by config/presets, so it must be a leaf, but it imports {above}"
    assert {"megagpt.errors", "megagpt.batch_rampup", "megagpt.data.spec"} <= leaves_used


def test_model_and_parallel_never_import_train():
    bad = [
        f"{imp.importer}:{imp.line} imports {imp.target}"
        for name in MODULES
        if in_room(name, "model", "parallel")
        for imp in megagpt_imports(name)
        if in_room(imp.target, "train")
    ]
    assert not bad, bad


def test_nothing_in_megagpt_imports_entry_points_or_tests():
    bad = [
        f"{imp.importer}:{imp.line} imports {imp.target}"
        for name in MODULES
        for imp in imports_of(name)
        if imp.target.split(".")[0] in NEVER_IMPORTED_BY_MEGAGPT
    ]
    assert not bad, bad


def test_function_local_megagpt_imports_are_listed_with_a_reason():
    local = {
        (i.importer, i.target)
        for name in MODULES
        for i in megagpt_imports(name)
        if i.function_local and not i.importer.startswith(LATE_IMPORTING_PACKAGE)
    }
    unlisted = sorted(local - set(FUNCTION_LOCAL))
    assert not unlisted, (
        f"megagpt imports inside functions: {unlisted}; move them to the top of the module, or, where a function "
        f"must import late (heavy optional dependencies), add them to FUNCTION_LOCAL with the reason"
    )
    stale = sorted(set(FUNCTION_LOCAL) - local)
    assert not stale, f"FUNCTION_LOCAL lists imports that are no longer inside functions: {stale}; remove them"
    assert all(reason.strip() for reason in FUNCTION_LOCAL.values())
