"""The node's identity on disk: its id, the machine it belongs to, and its incarnation.

The id is made once and kept; the incarnation goes up by one at every start, so peers can
tell a restarted node from its old self. The machine identity recorded with the id catches
a state directory copied to another Mac (exo's duplicate-node-id bug): the copy takes a new
id instead of fighting the original over the same one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sys
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)


def default_state_dir() -> Path:
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "tbmesh"
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tbmesh"


@dataclass(frozen=True)
class Identity:
    node_id: str
    machine: str
    incarnation: int


class StateDirInUse(Exception):
    """Another process holds the state directory's lock."""

    def __init__(self, state_dir: Path, pid: int | None) -> None:
        super().__init__(f"the state directory {state_dir} is in use by another tbmesh daemon"
                         f"{f' (pid {pid})' if pid is not None else ''}")
        self.pid = pid


def lock_state_dir(state_dir: Path) -> int:
    """Take the state directory for this process: an advisory lock (flock) on its `lock` file,
    which holds our pid. Two daemons on one directory would share a node id and clash in mDNS.

    Returns the lock's file descriptor: keep it open as long as the process runs (the kernel
    releases the lock when the process ends, even by kill -9). Raises StateDirInUse.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by children
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip()  # empty while it writes it
        os.close(fd)
        raise StateDirInUse(state_dir, int(holder) if holder.isdigit() else None) from None
    except BaseException:
        os.close(fd)
        raise
    # the file stays when we stop: removing it would let a newcomer lock a file already replaced
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def unlock_state_dir(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)  # closing the last descriptor releases the lock


def new_node_id() -> str:
    return uuid.uuid4().hex[:16]


def write_atomically(path: Path, text: str) -> None:
    """Write, fsync, rename: a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_identity(state_dir: Path, machine: str) -> Identity:
    """Read (or make) the identity and count this start as a new incarnation."""
    path = state_dir / "node.json"
    node_id, incarnation = None, 0
    try:
        data = json.loads(path.read_text())
        node_id, incarnation = str(data["node_id"]), int(data["incarnation"])
        if data.get("machine") != machine:
            log.warning(
                "state dir %s was made on another machine: taking a new node id "
                "instead of %s (a copied state dir would clash with the original)",
                state_dir, node_id,
            )
            node_id, incarnation = None, 0
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError) as error:
        log.warning("unreadable %s (%s): taking a new node id", path, error)
    identity = Identity(node_id or new_node_id(), machine, incarnation + 1)
    save_identity(state_dir, identity)
    return identity


def save_identity(state_dir: Path, identity: Identity) -> None:
    write_atomically(state_dir / "node.json", json.dumps(asdict(identity), indent=2) + "\n")
