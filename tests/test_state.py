"""The node's identity on disk."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from daemons import DaemonProcess, wait_for

from tbmesh.node import state


def test_the_id_is_kept_and_each_start_is_a_new_incarnation(tmp_path):
    first = state.load_identity(tmp_path, "machine-1")
    second = state.load_identity(tmp_path, "machine-1")
    assert second.node_id == first.node_id
    assert (first.incarnation, second.incarnation) == (1, 2)
    assert json.loads((tmp_path / "node.json").read_text())["incarnation"] == 2


def test_a_state_dir_copied_to_another_machine_takes_a_new_id(tmp_path, caplog):
    original = state.load_identity(tmp_path, "machine-1")
    copy = state.load_identity(tmp_path, "machine-2")
    assert copy.node_id != original.node_id and copy.incarnation == 1
    assert "another machine" in caplog.text


def test_an_unreadable_state_file_is_replaced_not_fatal(tmp_path, caplog):
    (tmp_path / "node.json").write_text("{half a fi")
    identity = state.load_identity(tmp_path, "m")
    assert identity.incarnation == 1 and "unreadable" in caplog.text


def test_writes_are_atomic_and_leave_no_temporary_files(tmp_path):
    state.write_atomically(tmp_path / "x.json", "one")
    state.write_atomically(tmp_path / "x.json", "two")
    assert (tmp_path / "x.json").read_text() == "two"
    assert os.listdir(tmp_path) == ["x.json"]


@pytest.mark.slow  # minutes: left out of ./dev test --quick
def test_two_macs_started_from_one_copied_state_dir_are_two_nodes(tmp_path, monkeypatch):
    """exo's bug: a state dir copied to a new Mac duplicated the node id and broke discovery."""
    model_args = ["--interface", "lo", "--memory", "2GB", "--cluster", f"copy{os.getpid()}", "--no-probe"]
    monkeypatch.setenv("TBMESH_MACHINE", "mac-one")
    a = DaemonProcess("a", tmp_path / "a", model_args).start()
    a_id = a.node_id
    a.terminate()
    subprocess.run(["cp", "-r", str(tmp_path / "a"), str(tmp_path / "b")], check=True)
    a = DaemonProcess("a", tmp_path / "a", model_args)
    monkeypatch.setenv("TBMESH_MACHINE", "mac-one")
    a.launch()
    monkeypatch.setenv("TBMESH_MACHINE", "mac-two")
    b = DaemonProcess("b", tmp_path / "b", model_args).launch()
    try:
        a.wait_started(), b.wait_started()
        assert a.node_id == a_id and b.node_id != a_id
        assert "another machine" in b.log()
        wait_for(lambda: len(a.status()["nodes"]) == 2 and {n["state"] for n in a.status()["nodes"]} == {"alive"},
                 20, "two distinct nodes")
    finally:
        a.kill()
        b.kill()
