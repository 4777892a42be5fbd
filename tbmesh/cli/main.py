"""The `tbmesh` command: every command group, in the order --help lists them.

One module a group: plan.py (`plan`), daemon.py (`daemon`, `install`, `uninstall`),
status_chat.py (`status`, `chat`), demo.py (`demo`), model.py (`model tiny`, `model pull`).
"""

from __future__ import annotations

from tbmesh.cli import daemon, demo, doctor, model, plan, status_chat
from tbmesh.cli.app import app

app.command("plan")(plan.plan)
app.command("daemon")(daemon.daemon)
app.command("status")(status_chat.status)
app.command("install")(daemon.install)
app.command("uninstall")(daemon.uninstall)
app.command("chat")(status_chat.chat)
app.command("demo")(demo.command)
app.command("doctor")(doctor.doctor)
app.add_typer(model.model_app, name="model")
