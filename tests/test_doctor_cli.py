"""`tbmesh doctor` run for real on this machine: its lines, its JSON, its exit status, and
whether a daemon answers."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from tbmesh.cli.doctor import daemon_problem


def doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tbmesh", "doctor", *args], capture_output=True, text=True,
                          check=False, timeout=60)  # fmt: skip


NOBODY = "http://127.0.0.1:9"  # the discard port: nothing listens there


def test_doctor_prints_each_finding_and_what_it_could_not_check():
    done = doctor("--api", NOBODY, "--shard-size", "1MB")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:2] == ["skipped", "macos"] and "not a Mac" in lines[0]
    daemon = next(i for i, line in enumerate(lines) if line.split()[1:2] == ["daemon"])
    assert lines[daemon].startswith("warning") and f"no tbmesh daemon answers at {NOBODY}" in lines[daemon]
    assert lines[daemon + 1].strip().startswith("fix: tbmesh daemon")
    assert lines[-1].startswith("0 problems, 1 warning, 1 fine; not checked here: macos, thunderbolt")


def test_doctor_json_and_exit_status_1_on_a_problem():
    done = doctor("--api", NOBODY, "--shard-size", "900TB", "--json")  # no disk here holds 900 TB
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    disk = next(f for f in report["findings"] if f["check"] == "disk")
    assert disk["status"] == "problem" and disk["fix"].startswith("free ")
    assert report["counts"]["problem"] == 1 and set(report["findings"][0]) == {"check", "status", "message", "fix"}


def test_a_bad_size_is_one_line_and_exit_status_2():
    done = doctor("--shard-size", "12 parsecs")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "--shard-size" in done.stderr


@pytest.mark.parametrize("status", [200, 401])  # a daemon that wants its API key answers too
def test_a_daemon_that_answers_is_found(status):
    class Status(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Status)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert daemon_problem(f"http://127.0.0.1:{server.server_port}") is None
    finally:
        server.shutdown()
        server.server_close()
    assert "refused" in daemon_problem(NOBODY)
