"""The `kd` command line: one module per pipeline stage, each a thin Typer command."""
