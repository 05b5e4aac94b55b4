"""The manual cannot drift from the code: every training command in README.md and docs/ loads and validates, every
file it names exists, every `section.key` it names is a real key, and docs/config.md is what config.py generates.

No process starts and nothing trains: a command's --config and overrides go through megagpt.config's loader and
validate() for the world size the command states (torchrun's --nnodes x --nproc_per_node, mpirun's -np, srun's
--ntasks, --dry-run's --world-size; else 1).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml

from megagpt.config import SECTIONS, config_from_dict, load_config, validate
from megagpt.errors import UserError

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
KEYS = {f"{name}.{field.name}" for name, cls in SECTIONS.items() for field in dataclasses.fields(cls)}
LAUNCHER = "launcher/pretrain.py"
RUNNERS = {"python", "python3", "torchrun", "srun", "mpirun", "mpiexec"}

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
# `section.key`, not preceded by a path or a word (megagpt/train/checkpoint.py is a file, not a key)
KEY_MENTION = re.compile(r"(?<![\w/.$-])(" + "|".join(SECTIONS) + r")\.([A-Za-z_]\w*)")
FILE_SUFFIXES = {"py", "yaml", "yml", "json", "jsonl", "md", "sh", "pt", "txt", "safetensors", "bin", "idx", "npy"}
# paths in the repository that a page names; a name with a capital placeholder (tools/X.py) is not a path
REPO_PATH = re.compile(r"(?<![\w/.-])((?:megagpt|tests|tools|bench|slurm|configs|launcher)/[\w/.-]*\w)")


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(text)]


def shell_lines(body: str) -> list[str]:
    """The block's commands, with backslash continuations joined."""
    return [line.strip() for line in body.replace("\\\n", " ").splitlines() if line.strip()]


def world_size_of(argv: list[str]) -> int:
    """The number of ranks the command asks for: the launcher's own flags for a dry run, else the runner's."""

    def value(*flags: str) -> int | None:
        for i, arg in enumerate(argv):
            for flag in flags:
                if arg == flag and i + 1 < len(argv):
                    return int(argv[i + 1])
                if arg.startswith(flag + "="):
                    return int(arg.split("=", 1)[1])
        return None

    if "--dry-run" in argv:
        return value("--world-size") or 1
    if (nproc := value("--nproc_per_node", "--nproc-per-node")) is not None:
        return nproc * (value("--nnodes") or 1)
    return value("-np", "-n", "--ntasks") or 1


def launcher_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """(--config, overrides) of the launcher's arguments, the way launcher/pretrain.py reads them."""
    args = argv[argv.index(next(a for a in argv if a.endswith(LAUNCHER))) + 1 :]
    config, overrides, i = None, [], 0
    while i < len(args):
        if args[i] == "--config":
            config, i = args[i + 1], i + 2
        elif args[i] in ("--world-size", "--meta-ranks"):
            i += 2
        elif args[i].startswith("--"):
            i += 1
        else:
            overrides.append(args[i])
            i += 1
    return config, overrides


def check_command(line: str) -> str | None:
    """None if the command's config and overrides validate for its world size, else why not."""
    if LAUNCHER not in line:  # output blocks hold prose with apostrophes; only commands are split
        return None
    argv = shlex.split(line, comments=True)
    words = [a for a in argv if not re.match(r"^[A-Z_]+=", a)]  # env assignments (DATA=...) before the command
    if not words or Path(words[0]).name not in RUNNERS or not any(a.endswith(LAUNCHER) for a in argv):
        return None  # prose or a diagram that names the launcher
    config, overrides = launcher_args(argv)
    if config is None:
        return "no --config"
    if not (REPO / config).is_file():
        return f"--config {config} does not exist"
    world = world_size_of(argv)
    try:
        validate(load_config(REPO / config, overrides), world)
    except UserError as e:
        return f"does not validate for {world} ranks: {e}"
    return None


def command_problems(text: str) -> list[str]:
    problems = []
    for language, body in code_blocks(text):
        if language == "yaml" and body.lstrip().startswith("preset:"):
            try:
                validate(config_from_dict(yaml.safe_load(body)))
            except UserError as e:
                problems.append(f"yaml block {body.splitlines()[0]!r}: {e}")
        elif language in ("", "bash", "sh", "console"):
            for line in shell_lines(body):
                if (why := check_command(line)) is not None:
                    problems.append(f"{line}\n    {why}")
    return problems


def key_problems(text: str) -> list[str]:
    """Names that look like `section.key` but are no key (file names such as model.safetensors aside)."""
    bad = []
    for m in KEY_MENTION.finditer(text):
        if m.group(2) in FILE_SUFFIXES:
            continue
        if m.group(0) not in KEYS:
            bad.append(m.group(0))
    return sorted(set(bad))


def path_problems(text: str) -> list[str]:
    return sorted({p for p in REPO_PATH.findall(text) if not (REPO / p).exists()} - {"tools/X.py"})


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_training_command_validates_for_its_world_size(page):
    problems = command_problems(page.read_text())
    assert not problems, f"{page.relative_to(REPO)}: commands that would not start:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_config_key_named_is_real(page):
    bad = key_problems(page.read_text())
    assert not bad, f"{page.relative_to(REPO)} names config keys that megagpt/config.py does not have: {bad}"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_file_named_exists(page):
    missing = path_problems(page.read_text())
    assert not missing, f"{page.relative_to(REPO)} names files that do not exist: {missing}"


def test_the_pages_have_training_commands_to_check():
    """The checks above must see the commands (a changed fence or launcher path would make them vacuous)."""
    commands = [
        line
        for page in DOCS
        for language, body in code_blocks(page.read_text())
        for line in shell_lines(body)
        if LAUNCHER in line and language in ("", "bash")
    ]
    assert len(commands) >= 15, commands
    assert any(line.startswith("torchrun") for line in commands) and any("mpirun" in line for line in commands)


def test_the_checks_catch_a_wrong_key_an_invalid_override_and_a_missing_file():
    page = """
Set `train.iterations=5` or `model.num_layers`; the weights are in `model.safetensors`, see tools/nope.py.

```bash
python launcher/pretrain.py --config configs/tiny-cpu.yaml train.iters=10
torchrun --nproc_per_node 3 launcher/pretrain.py --config configs/tiny-cpu.yaml parallel.tp=2   # 3 ranks
python launcher/pretrain.py --config configs/tiny-cpu.yaml model.num_layer=3
python launcher/pretrain.py --config configs/none.yaml
```
"""
    assert key_problems(page) == ["model.num_layer", "train.iterations"]
    assert path_problems(page) == ["configs/none.yaml", "tools/nope.py"]
    problems = command_problems(page)
    assert len(problems) == 3, problems
    assert "does not validate for 3 ranks" in problems[0] and "parallel.tp" in problems[0]
    assert "model.num_layer" in problems[1]
    assert "configs/none.yaml does not exist" in problems[2]


def test_world_sizes_are_read_from_each_runner():
    assert world_size_of(shlex.split("torchrun --nnodes 16 --nproc_per_node 8 launcher/pretrain.py")) == 128
    assert world_size_of(shlex.split("mpirun -np 4 python launcher/pretrain.py")) == 4
    assert world_size_of(shlex.split("srun --ntasks=6 python launcher/pretrain.py")) == 6
    assert world_size_of(shlex.split("python launcher/pretrain.py --dry-run --world-size 1024")) == 1024
    assert world_size_of(shlex.split("python launcher/pretrain.py")) == 1


def test_config_reference_is_generated_from_config_py():
    spec = importlib.util.spec_from_file_location("gen_config_docs", REPO / "tools" / "gen_config_docs.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    assert (REPO / "docs" / "config.md").read_text() == generator.render(), (
        "docs/config.md is stale: run `make docs` (python tools/gen_config_docs.py)"
    )
    for key in KEYS:  # and it lists every key
        assert f"`{key}`" in generator.render()
