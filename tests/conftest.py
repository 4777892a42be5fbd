"""Shared pytest set-up."""

from __future__ import annotations

from collections.abc import Iterator

import netns
import pytest

# the fixtures of tests that generate through real daemons: model_dir, reference, cluster
pytest_plugins = ["serving"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "needs_root: needs root and iproute2 (network-namespace lab); skipped otherwise"
    )
    config.addinivalue_line(
        "markers", "slow: minutes long; left out of `./dev test --quick` (`./dev test` and CI run every test)"
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("needs_root"):
        reason = netns.unavailable_reason()
        if reason:
            pytest.skip(reason)


@pytest.fixture
def lab() -> Iterator[netns.Lab]:
    """A network-namespace lab of Macs and cables, torn down after the test (even a failing one)."""
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with netns.Lab() as the_lab:
        yield the_lab


@pytest.fixture(scope="session")
def taught_model(tmp_path_factory: pytest.TempPathFactory):
    """`tbmesh model tiny DIR --teach default`, taught once a session (about 10 s on a CPU)."""
    from tbmesh.testbed.teach import CONVERSATIONS
    from tbmesh.testbed.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("taught") / "taught", teach=CONVERSATIONS)
