"""`python -m tbmesh`, the same as the `tbmesh` command."""

from tbmesh.cli import app

app(prog_name="tbmesh")
