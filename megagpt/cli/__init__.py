"""The command-line programs: each module's main(argv) parses its arguments, prints a user error as one sentence and
returns (or exits with) status 2. launcher/pretrain.py and tools/*.py are thin scripts calling them, and
pyproject.toml's [project.scripts] installs them as megagpt-* commands."""
