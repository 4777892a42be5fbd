"""The launchd service: the plist that runs `tbmesh daemon` at boot, and the launchctl steps.

System LaunchDaemon by default, per-user LaunchAgent as an option
------------------------------------------------------------------
A headless Mac Studio must run tbmesh with nobody logged in. A LaunchAgent lives in the
`gui/<uid>` domain, which exists only while that user has a desktop session: after a
reboot it does not run until someone logs in (automatic login would do, but macOS turns
it off when FileVault is on), and `launchctl bootstrap gui/<uid>` from an SSH session with
no desktop login fails. A LaunchDaemon (`/Library/LaunchDaemons`, domain `system`) starts
at boot, before any login, so that is the default. It runs as the user who installed it
(`UserName`, from sudo's SUDO_USER or `--user`), not as root, with HOME set to that user's
home: the daemon keeps the same state directory (`default_state_dir()`, the node id) and
reads the same model files as `tbmesh daemon` run by hand.

Metal works in a LaunchDaemon on Apple silicon: compute needs no WindowServer session.
The catch is `MTLCreateSystemDefaultDevice()`, which macOS 14+ refuses to non-interactive
processes (daemons, command-line tools); MLX asks `MTLCopyAllDevices()` first and only
falls back to the default device, so it finds the GPU from a daemon. An LLM server on MLX
run as a LaunchDaemon under a service account was reported to serve before any login,
and to leave about 1 GB more unified memory to the model with no desktop session
(Rapid-MLX issue #2859).

A launchd job is its own "responsible process" for macOS privacy protection (TCC): it does not
inherit Terminal's grants, so ~/Desktop, ~/Documents, ~/Downloads, iCloud Drive and external
volumes (/Volumes) give it "Operation not permitted" unless its program has Full Disk
Access. `install` warns when the program or a path argument is in one (`protected_paths`).

`--user-agent` installs a LaunchAgent instead (no sudo; runs only while its user is
logged in to the desktop): for a laptop that is part of the cluster only when in use.

Keys, and why
-------------
- ProcessType Interactive: with no ProcessType launchd applies "light resource limits,
  throttling its CPU usage and I/O bandwidth" (launchd.plist(5)), and Background confines
  a job to the efficiency cores and clamps its GPU work: an MLX server under launchd was
  measured at 11 tok/s with Background and 87 with Interactive (dryvist/nix-ai#916).
  tbmesh serves requests someone is waiting for, and its heartbeats must not starve.
- KeepAlive {SuccessfulExit: false}: restarted after a crash, an out-of-memory kill or an
  error exit (a named interface not there yet at boot exits 2, and is tried again), but a
  deliberate clean stop (SIGTERM or SIGINT: the daemon says goodbye and exits 0) is
  respected until the next boot or `launchctl kickstart`.
- ThrottleInterval 10: at most one start per 10 s, so an error that repeats at every
  start does not spin (launchd's own default, written out so it is visible).
- RunAtLoad: start at boot (daemon) or login (agent), and at `launchctl bootstrap`.
- StandardOutPath and StandardErrorPath: one file, `~/Library/Logs/tbmesh/daemon.log` of
  the user the service runs as, for both kinds, so `tail -f` needs no sudo. The daemon logs
  to stderr; PYTHONUNBUFFERED makes anything printed to stdout appear at once too.
- EnvironmentVariables: HOME written out rather than left to launchd, so that
  `default_state_dir()` is the user's; PATH with the venv's bin first, then launchd's
  default (the system directories that hold networksetup, ifconfig and sysctl).
- WorkingDirectory: the user's home; every path in the arguments is made absolute anyway.

The launchctl steps: `bootout` (an older copy, if loaded; it may fail), `enable` (a
service once disabled refuses to bootstrap), `bootstrap` (loads the plist; RunAtLoad
starts it). launchd lets go of a label a few seconds after `bootout` returns, and a
`bootstrap` in that window fails with exit status 5 (EIO): `install` waits until
`launchctl print` no longer finds the old one, and retries a bootstrap that fails with 5.

`launchd/com.tbmesh.daemon.plist` in the repository is `example_plist_text()`, the one
place to read a whole plist; regenerate it with
`python -m tbmesh.cli.launchd > launchd/com.tbmesh.daemon.plist` (a test compares them).
"""

from __future__ import annotations

import os
import plistlib
import pwd
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tbmesh.node.state import write_atomically

LABEL = "com.tbmesh.daemon"
DAEMON, AGENT = "daemon", "agent"  # system LaunchDaemon, per-user LaunchAgent
DAEMONS_DIR = Path("/Library/LaunchDaemons")
AGENTS_SUBDIR = Path("Library/LaunchAgents")  # under the user's home
LOGS_SUBDIR = Path("Library/Logs/tbmesh")  # under the user's home
LOG_NAME = "daemon.log"
SYSTEM_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"  # launchd's default PATH
THROTTLE_S = 10
EIO = 5  # launchctl's exit status for "Bootstrap failed: 5: Input/output error"


class InstallError(RuntimeError):
    """Installing or removing the service failed; the message is one line for the user."""


@dataclass(frozen=True)
class DaemonFlags:
    """The `tbmesh daemon` options the service is started with (None: the daemon's default)."""

    interfaces: tuple[str, ...] = ()
    model: Path | None = None
    cluster: str | None = None
    secret_file: Path | None = None
    name: str | None = None
    port: int | None = None
    api_host: str | None = None
    api_port: int | None = None
    state_dir: Path | None = None
    context: int | None = None
    log_level: str | None = None
    mqtt: str | None = None
    resume_wait: float | None = None
    ollama_port: int | None = None
    api_key_file: Path | None = None
    parallel: str | None = None
    replicas: int | None = None
    disk_slack: str | None = None  # as given, e.g. "200GB"; the daemon parses it
    prefill_chunk: int | None = None
    prefix_cache: bool | None = None  # --prefix-cache or --no-prefix-cache
    insecure: bool = False  # --insecure: no secret on interfaces that are not Thunderbolt
    api_allow_hosts: tuple[str, ...] = ()

    def arguments(self) -> list[str]:
        """The flags as arguments after `tbmesh daemon`; paths made absolute (launchd's working
        directory is not the one install ran in)."""
        args: list[str] = []
        for interface in self.interfaces:
            args += ["--interface", interface]
        options: tuple[tuple[str, object], ...] = (
            ("--model", self.model), ("--cluster", self.cluster), ("--secret-file", self.secret_file),
            ("--name", self.name), ("--port", self.port), ("--api-host", self.api_host),
            ("--api-port", self.api_port), ("--state-dir", self.state_dir), ("--context", self.context),
            ("--log-level", self.log_level), ("--mqtt", self.mqtt), ("--resume-wait", self.resume_wait),
            ("--ollama-port", self.ollama_port), ("--api-key-file", self.api_key_file),
            ("--parallel", self.parallel), ("--replicas", self.replicas), ("--disk-slack", self.disk_slack),
            ("--prefill-chunk", self.prefill_chunk),
        )  # fmt: skip
        for flag, value in options:
            if value is not None:
                args += [flag, str(Path(value).expanduser().absolute()) if isinstance(value, Path) else str(value)]
        if self.prefix_cache is not None:
            args.append("--prefix-cache" if self.prefix_cache else "--no-prefix-cache")
        if self.insecure:
            args.append("--insecure")
        for host in self.api_allow_hosts:
            args += ["--api-allow-host", host]
        return args


@dataclass(frozen=True)
class Service:
    """Where the service is installed, as whom, and what it runs."""

    kind: str  # DAEMON or AGENT
    user: str
    uid: int
    home: Path
    program: Path  # the absolute path of the `tbmesh` executable
    arguments: tuple[str, ...]  # after `tbmesh daemon`
    plist_path: Path
    log_path: Path

    @property
    def domain(self) -> str:
        return "system" if self.kind == DAEMON else f"gui/{self.uid}"

    @property
    def target(self) -> str:
        return f"{self.domain}/{LABEL}"


def find_program() -> Path:
    """The installed `tbmesh` executable: the one next to this Python (a venv's bin), else PATH's.

    sys.executable is not resolved: in a venv it is a symlink to the base Python, whose
    directory holds no tbmesh.
    """
    beside = Path(sys.executable).absolute().parent / "tbmesh"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("tbmesh")
    if found is None:
        raise InstallError("cannot find the tbmesh executable (not next to this Python, not on PATH); "
                           "install the package with pip first")  # fmt: skip
    return Path(found).absolute()


def make_service(kind: str, user: str, program: Path, arguments: list[str]) -> Service:
    """The service for `user` (who must exist), with the standard paths."""
    if kind not in (DAEMON, AGENT):
        raise ValueError(f"unknown service kind {kind!r}")
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise InstallError(f"no user named {user!r} on this machine") from None
    home = Path(entry.pw_dir)
    plist_dir = DAEMONS_DIR if kind == DAEMON else home / AGENTS_SUBDIR
    return Service(kind, user, entry.pw_uid, home, program, tuple(arguments),
                   plist_dir / f"{LABEL}.plist", home / LOGS_SUBDIR / LOG_NAME)  # fmt: skip


def build_plist(service: Service) -> dict[str, object]:
    """The launchd job as a dict (see the module docstring for each key)."""
    plist: dict[str, object] = {
        "Label": LABEL,
        "ProgramArguments": [str(service.program), "daemon", *service.arguments],
        "WorkingDirectory": str(service.home),
        "EnvironmentVariables": {
            "HOME": str(service.home),
            "PATH": f"{service.program.parent}:{SYSTEM_PATH}",
            "PYTHONUNBUFFERED": "1",
        },
        "StandardOutPath": str(service.log_path),
        "StandardErrorPath": str(service.log_path),
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": THROTTLE_S,
        "ProcessType": "Interactive",
    }
    if service.kind == DAEMON:
        plist["UserName"] = service.user  # a LaunchAgent already runs as its user
    return plist


def plist_bytes(service: Service) -> bytes:
    return plistlib.dumps(build_plist(service))


def other_kind_plist(service: Service) -> Path:
    """Where the other kind would be: both at once would fight over the same ports."""
    if service.kind == AGENT:
        return DAEMONS_DIR / f"{LABEL}.plist"
    return service.home / AGENTS_SUBDIR / f"{LABEL}.plist"


def install_commands(service: Service) -> list[list[str]]:
    """The launchctl commands that (re)load the service, in order."""
    return [
        ["launchctl", "bootout", service.target],
        ["launchctl", "enable", service.target],
        ["launchctl", "bootstrap", service.domain, str(service.plist_path)],
    ]


def uninstall_commands(service: Service) -> list[list[str]]:
    return [["launchctl", "bootout", service.target]]


# folders macOS privacy protection (TCC) keeps from a launchd job unless its program has Full
# Disk Access: the job is its own responsible process, it inherits no Terminal's grants
PROTECTED_IN_HOME = ("Desktop", "Documents", "Downloads", "Library/Mobile Documents")
PROTECTED_VOLUMES = Path("/Volumes")  # removable and network volumes


def protected_paths(service: Service) -> list[Path]:
    """The program and path arguments that a launchd job may be refused ("Operation not
    permitted") though the same command works from Terminal."""
    roots = [service.home / name for name in PROTECTED_IN_HOME] + [PROTECTED_VOLUMES]
    paths = [service.program] + [Path(a) for a in service.arguments if a.startswith("/")]
    return [p for p in paths if any(p == root or root in p.parents for root in roots)]


# --- carrying it out (macOS only; tests pass a fake `run`) ---------------------------------

Runner = Callable[[list[str]], "subprocess.CompletedProcess[str]"]


def run_launchctl(args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run one launchctl command; the only place tbmesh runs launchctl."""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise InstallError(f"{' '.join(args)}: {error}") from None


def _reason(done: subprocess.CompletedProcess[str]) -> str:
    lines = (done.stderr or done.stdout or "").strip().splitlines()
    return lines[-1] if lines else f"exit status {done.returncode}"


def install(service: Service, run: Runner = run_launchctl, wait_s: float = 10.0) -> None:
    """Write the log file and the plist, then (re)load the service with launchctl."""
    # launchd creates no directories; under sudo what we make for the user must be theirs
    _make_dirs(service, service.log_path.parent, owned=True)
    service.log_path.touch(exist_ok=True)
    _give_to(service, service.log_path)
    _make_dirs(service, service.plist_path.parent, owned=service.kind == AGENT)
    write_atomically(service.plist_path, plist_bytes(service).decode())
    # launchd refuses a system plist writable by others; 0644 like every plist there
    os.chmod(service.plist_path, 0o644)
    if service.kind == AGENT:
        _give_to(service, service.plist_path)
    bootout, enable, bootstrap = install_commands(service)
    if run(bootout).returncode == 0:  # an older copy was loaded: let launchd finish removing it
        _wait_gone(service, run, wait_s)
    _check(run(enable), enable)
    deadline = time.monotonic() + wait_s
    done = run(bootstrap)
    while done.returncode == EIO and time.monotonic() < deadline:
        time.sleep(0.5)  # launchd still releasing the label a moment after bootout
        done = run(bootstrap)
    _check(done, bootstrap)


def uninstall(service: Service, run: Runner = run_launchctl) -> tuple[bool, bool]:
    """Unload the service and remove its plist: (it was loaded, a plist was removed)."""
    (bootout,) = uninstall_commands(service)
    loaded = run(bootout).returncode == 0  # fails when it was not loaded: nothing to stop
    removed = service.plist_path.exists()
    service.plist_path.unlink(missing_ok=True)
    return loaded, removed


def _wait_gone(service: Service, run: Runner, wait_s: float) -> None:
    """bootout returns before launchd lets go of the label (seconds later, measured by others);
    a bootstrap in that window fails with "Bootstrap failed: 5: Input/output error"."""
    deadline = time.monotonic() + wait_s
    while run(["launchctl", "print", service.target]).returncode == 0 and time.monotonic() < deadline:
        time.sleep(0.2)


def _check(done: subprocess.CompletedProcess[str], command: list[str]) -> None:
    if done.returncode != 0:
        raise InstallError(f"{' '.join(command)}: {_reason(done)}")


def _make_dirs(service: Service, directory: Path, owned: bool) -> None:
    """mkdir -p; with `owned`, the directories it made are given to the service's user."""
    missing = [p for p in (directory, *directory.parents) if not p.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    for path in missing if owned else []:
        _give_to(service, path)


def _give_to(service: Service, path: Path) -> None:
    """Under sudo the files are made by root: hand them to the user the service runs as."""
    if os.geteuid() == 0 and service.uid != 0:
        os.chown(path, service.uid, pwd.getpwuid(service.uid).pw_gid)


# --- the example shipped in launchd/ -------------------------------------------------------

EXAMPLE_HOME = Path("/Users/alice")
EXAMPLE_FLAGS = DaemonFlags(
    model=EXAMPLE_HOME / "models" / "Kimi-K2-Thinking",
    cluster="studio",
    secret_file=EXAMPLE_HOME / "Library" / "Application Support" / "tbmesh" / "secret",
)


def example_service() -> Service:
    """User alice (uid 501) with tbmesh in ~/tbmesh/.venv, after
    `sudo .venv/bin/tbmesh install --model ~/models/Kimi-K2-Thinking --cluster studio
    --secret-file ~/Library/Application\\ Support/tbmesh/secret`."""
    return Service(DAEMON, "alice", 501, EXAMPLE_HOME, EXAMPLE_HOME / "tbmesh" / ".venv" / "bin" / "tbmesh",
                   tuple(EXAMPLE_FLAGS.arguments()), DAEMONS_DIR / f"{LABEL}.plist",
                   EXAMPLE_HOME / LOGS_SUBDIR / LOG_NAME)  # fmt: skip


EXAMPLE_COMMENT = """<!--
  An example of what `sudo tbmesh install` writes to /Library/LaunchDaemons/com.tbmesh.daemon.plist,
  here for user alice with tbmesh in ~/tbmesh/.venv. Run tbmesh install with its dry-run
  flag to see yours.
  Generated by `python -m tbmesh.cli.launchd` from tbmesh/cli/launchd.py, which explains each key.
-->
"""


def example_plist_text() -> str:
    """The example plist with a comment after the DOCTYPE line (plistlib writes no comments)."""
    text = plist_bytes(example_service()).decode()
    head, doctype, rest = text.partition("<!DOCTYPE")
    line_end = rest.index("\n") + 1
    return head + doctype + rest[:line_end] + EXAMPLE_COMMENT + rest[line_end:]


if __name__ == "__main__":
    sys.stdout.write(example_plist_text())
