"""Claims of the README about the code's constants, checked against the code (issue 26): a
test fails when one of them drifts. Each test names the README section it keeps."""

from __future__ import annotations

import re
from pathlib import Path

from zeroconf import const as zeroconf_const

from tbmesh.node.daemon import MEMORY_CHECK_S
from tbmesh.runtime.shard import FAMILIES

README = (Path(__file__).parent.parent / "README.md").read_text()


def flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_running_a_model_lists_every_supported_family():
    """README, "Running a model": "Supported families: ..." names exactly the shard's families."""
    sentence = flat(README).split("Supported families: ", 1)[1].split(". ", 1)[0]
    named = set(re.findall(r"\b([a-z][a-z0-9_]+)\b(?![^(]*\))", sentence)) - {"and"}
    assert named == set(FAMILIES), sentence


def test_running_the_daemon_states_zeroconfs_record_lifetimes():
    """README, "Running the daemon" (Discovery): mDNS records' lifetimes as zeroconf keeps them."""
    assert zeroconf_const._DNS_HOST_TTL == 2 * 60 and zeroconf_const._DNS_OTHER_TTL == 75 * 60
    assert "keep address records 2 minutes and the others 75" in flat(README)


def test_install_on_macs_says_how_often_the_wired_limit_is_read():
    """README, "Install on Macs" (GPU wired-memory limit): read at start and every MEMORY_CHECK_S."""
    assert f"read at start and again every {MEMORY_CHECK_S:g} s" in flat(README)
