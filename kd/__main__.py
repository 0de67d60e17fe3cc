"""`python -m kd`: the `kd` command line."""

from kd.cli import app

app(prog_name="kd")
