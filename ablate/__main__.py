"""`python -m ablate` is the `ablate` command."""

from ablate.cli import run

run()
