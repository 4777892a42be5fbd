"""`python -m tbmesh`, the same as the `tbmesh` command."""

from tbmesh.cli.main import app

app(prog_name="tbmesh")
