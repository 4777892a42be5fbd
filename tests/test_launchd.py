"""The launchd service: the plist tbmesh generates, `tbmesh install/uninstall --dry-run` run as
the real console script, the refusal off macOS, and the install steps with a fake launchctl."""

from __future__ import annotations

import dataclasses
import os
import plistlib
import pwd
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tbmesh.cli import launchd
from tbmesh.cli.launchd import AGENT, DAEMON, LABEL, DaemonFlags, InstallError, Service

TBMESH = Path(sys.executable).parent / "tbmesh"
REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "launchd" / "com.tbmesh.daemon.plist"
ME = pwd.getpwuid(os.getuid())  # the account these tests run as (root in CI)


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "SUDO_USER"}  # as if not under sudo
    return subprocess.run([str(TBMESH), *args], capture_output=True, text=True, timeout=60,
                          env={**environment, **(env or {})})  # fmt: skip


def dry_run_install(*args: str, env: dict[str, str] | None = None) -> tuple[dict, list[str], str]:
    """The plist, the commands and the first line of `tbmesh install --dry-run ARGS`."""
    result = run("install", "--dry-run", *args, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("<?xml"))
    end = lines.index("</plist>")
    plist = plistlib.loads("\n".join(lines[start : end + 1]).encode())
    assert lines[end + 1].endswith("then run:")
    return plist, lines[end + 2 :], lines[0]


@pytest.fixture
def model_and_secret(tmp_path: Path) -> tuple[Path, Path]:
    model = tmp_path / "models" / "tiny"
    model.mkdir(parents=True)
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    return model, secret


# --- the plist -----------------------------------------------------------------------------


def daemon_service(*args: str) -> Service:
    return launchd.make_service(DAEMON, ME.pw_name, launchd.find_program(), list(args))


def test_daemon_plist_has_every_key():
    service = daemon_service("--model", "/models/m", "--cluster", "lab")
    plist = plistlib.loads(launchd.plist_bytes(service))
    program = Path(plist["ProgramArguments"][0])
    assert program.is_absolute() and program.is_file() and os.access(program, os.X_OK)
    assert program == TBMESH  # the console script of this venv, not the base Python's directory
    assert plist["ProgramArguments"][1:] == ["daemon", "--model", "/models/m", "--cluster", "lab"]
    assert plist["Label"] == LABEL == "com.tbmesh.daemon"
    home = Path(ME.pw_dir)
    log = str(home / "Library" / "Logs" / "tbmesh" / "daemon.log")
    assert plist["StandardOutPath"] == plist["StandardErrorPath"] == log
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["ThrottleInterval"] == 10
    assert plist["ProcessType"] == "Interactive"
    assert plist["UserName"] == ME.pw_name  # a LaunchDaemon runs as the user, not as root
    assert plist["WorkingDirectory"] == str(home)
    env = plist["EnvironmentVariables"]
    assert env["HOME"] == str(home)  # so default_state_dir() is the user's
    assert env["PATH"].split(":")[0] == str(TBMESH.parent)
    assert {"/usr/sbin", "/sbin"} <= set(env["PATH"].split(":"))  # networksetup, sysctl, ifconfig
    assert service.plist_path == Path("/Library/LaunchDaemons/com.tbmesh.daemon.plist")
    assert service.target == "system/com.tbmesh.daemon"


def test_agent_plist_lives_in_the_users_library_and_domain():
    service = launchd.make_service(AGENT, ME.pw_name, launchd.find_program(), [])
    plist = plistlib.loads(launchd.plist_bytes(service))
    assert "UserName" not in plist
    assert plist["ProgramArguments"] == [str(TBMESH), "daemon"]
    assert service.plist_path == Path(ME.pw_dir) / "Library" / "LaunchAgents" / "com.tbmesh.daemon.plist"
    assert service.domain == f"gui/{ME.pw_uid}"
    assert launchd.install_commands(service)[-1] == ["launchctl", "bootstrap", f"gui/{ME.pw_uid}",
                                                     str(service.plist_path)]  # fmt: skip


def test_daemon_flags_become_arguments_with_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    flags = DaemonFlags(interfaces=("en2", "en*"), model=Path("models/m"), cluster="lab",
                        secret_file=Path("secret"), port=7480, context=0, log_level="debug",
                        mqtt="mqtt://nas:1883", resume_wait=60.0, ollama_port=11434,
                        api_key_file=Path("api-key"), parallel="tensor", replicas=3, disk_slack="200GB",
                        prefill_chunk=256, prefix_cache=False, api_allow_hosts=("studio.example", "mac.lan"))  # fmt: skip
    assert flags.arguments() == [
        "--interface", "en2", "--interface", "en*", "--model", str(tmp_path / "models" / "m"),
        "--cluster", "lab", "--secret-file", str(tmp_path / "secret"), "--port", "7480",
        "--context", "0", "--log-level", "debug", "--mqtt", "mqtt://nas:1883", "--resume-wait", "60.0",
        "--ollama-port", "11434", "--api-key-file", str(tmp_path / "api-key"),
        "--parallel", "tensor", "--replicas", "3", "--disk-slack", "200GB", "--prefill-chunk", "256",
        "--no-prefix-cache", "--api-allow-host", "studio.example", "--api-allow-host", "mac.lan",
    ]  # fmt: skip
    assert DaemonFlags(prefix_cache=True).arguments() == ["--prefix-cache"]
    assert DaemonFlags().arguments() == []  # nothing given: the daemon's own defaults


def test_unknown_user_is_refused():
    with pytest.raises(InstallError, match="no user named"):
        launchd.make_service(DAEMON, "no-such-user-tbmesh", TBMESH, [])


def test_paths_a_launchd_job_may_be_refused_are_found():
    home = Path("/Users/alice")
    service = dataclasses.replace(
        launchd.example_service(),
        program=home / "Documents" / "tbmesh" / ".venv" / "bin" / "tbmesh",
        arguments=("--model", "/Volumes/T7/models/kimi", "--secret-file", str(home / "secret"),
                   "--cluster", "lab"),
    )  # fmt: skip
    assert launchd.protected_paths(service) == [service.program, Path("/Volumes/T7/models/kimi")]
    assert launchd.protected_paths(launchd.example_service()) == []  # ~/models and ~/Library are fine


def test_the_other_kind_is_looked_for_where_it_would_be():
    daemon = launchd.make_service(DAEMON, ME.pw_name, TBMESH, [])
    agent = launchd.make_service(AGENT, ME.pw_name, TBMESH, [])
    assert launchd.other_kind_plist(daemon) == agent.plist_path
    assert launchd.other_kind_plist(agent) == daemon.plist_path


def test_shipped_plist_is_the_documented_example():
    text = SHIPPED.read_text()
    assert text == launchd.example_plist_text()  # regenerate: python -m tbmesh.cli.launchd > launchd/...
    plist = plistlib.loads(text.encode())  # the comment keeps it a valid plist
    assert plist == launchd.build_plist(launchd.example_service())
    assert plist["ProgramArguments"][:2] == ["/Users/alice/tbmesh/.venv/bin/tbmesh", "daemon"]
    assert plist["UserName"] == "alice"


# --- the command, run as the real console script -----------------------------------------


def test_install_dry_run_prints_the_plist_and_the_launchctl_commands(model_and_secret):
    model, secret = model_and_secret
    plist, commands, first = dry_run_install(
        "--user", ME.pw_name, "--interface", "en2", "--interface", "en3", "--model", str(model),
        "--cluster", "lab", "--secret-file", str(secret), "--api-port", "7481",
    )  # fmt: skip
    assert first == "# would write /Library/LaunchDaemons/com.tbmesh.daemon.plist:"
    program = Path(plist["ProgramArguments"][0])
    assert program.is_absolute() and program.exists()
    assert plist["ProgramArguments"][1:] == [
        "daemon", "--interface", "en2", "--interface", "en3", "--model", str(model),
        "--cluster", "lab", "--secret-file", str(secret), "--api-port", "7481",
    ]  # fmt: skip
    assert plist["UserName"] == ME.pw_name and plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["StandardErrorPath"] == str(Path(ME.pw_dir) / "Library/Logs/tbmesh/daemon.log")
    assert commands == [
        "launchctl bootout system/com.tbmesh.daemon",
        "launchctl enable system/com.tbmesh.daemon",
        "launchctl bootstrap system /Library/LaunchDaemons/com.tbmesh.daemon.plist",
    ]


@pytest.mark.parametrize(
    "args",
    [
        ["--context", "8192"],
        ["--parallel", "pipeline"],
        ["--replicas", "3"],
        ["--disk-slack", "200GB"],
        ["--prefill-chunk", "1024"],
        ["--prefix-cache"],
        ["--no-prefix-cache"],
        ["--api-allow-host", "studio.example", "--api-allow-host", "mac.lan"],
    ],
)
def test_install_passes_serving_options_to_the_daemon(args: list[str]):
    plist, _, _ = dry_run_install("--user", ME.pw_name, *args)
    assert plist["ProgramArguments"][1:] == ["daemon", *args]


def test_install_dry_run_user_agent():
    plist, commands, first = dry_run_install("--user-agent")
    agents = Path(ME.pw_dir) / "Library" / "LaunchAgents" / "com.tbmesh.daemon.plist"
    assert first == f"# would write {agents}:"
    assert "UserName" not in plist and plist["ProgramArguments"][1:] == ["daemon"]
    assert commands[0] == f"launchctl bootout gui/{ME.pw_uid}/com.tbmesh.daemon"
    assert commands[-1] == f"launchctl bootstrap gui/{ME.pw_uid} {agents}"


def test_install_runs_as_the_user_who_ran_sudo():
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' here")
    plist, _, _ = dry_run_install(env={"SUDO_USER": "nobody"})
    assert plist["UserName"] == "nobody"
    assert plist["EnvironmentVariables"]["HOME"] == nobody.pw_dir
    assert plist["StandardOutPath"].startswith(nobody.pw_dir.rstrip("/") + "/Library/Logs/tbmesh/")


def test_install_warns_about_folders_launchd_jobs_cannot_read():
    state = Path(ME.pw_dir) / "Documents" / "tbmesh-state"  # not checked for existence: nothing made
    result = run("install", "--dry-run", "--user", ME.pw_name, "--state-dir", str(state))
    assert result.returncode == 0
    assert result.stderr.startswith(f"warning: {state} is in a folder macOS keeps from launchd services")
    assert result.stderr.count("\n") == 1


@pytest.mark.skipif(ME.pw_uid != 0, reason="only root is asked which user to run as")
def test_install_as_root_without_sudo_asks_which_user():
    result = run("install", "--dry-run")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: which user should tbmesh run as?")
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/no/such/model"], "error: --model /no/such/model: no such directory\n"),
        (["--secret-file", "/no/such/secret"], "error: --secret-file /no/such/secret: no such file\n"),
        (["--port", "70000"], "error: bad --port 70000: a port is 0 to 65535\n"),
        (["--context", "-1"], "error: --context must be 0 or more tokens\n"),
        (["--parallel", "layers"], "error: bad --parallel 'layers': use auto, pipeline, tensor\n"),
        (["--replicas", "0"], "error: --replicas must be 1 or more\n"),
        (["--replicas", "two"], None),  # not a number: click's message
        (["--disk-slack", "lots"],
         "error: --disk-slack: bad size 'lots': expected a number and a unit, e.g. 512GB, 9.6GiB or 1234\n"),
        (["--prefill-chunk", "0"], "error: --prefill-chunk must be 1 or more\n"),
        (["--prefix-cache=no"], None),  # a switch takes no value
        (["--secret", "x"], None),  # a secret in a world-readable plist: not offered
        (["--api-allow-host", "studio.example:7471"],
         "error: bad --api-allow-host 'studio.example:7471': give a host name as clients write it in the API's URL, "
         "without scheme or port (e.g. studio.example.com)\n"),
    ],
)
def test_install_rejects_bad_options(args: list[str], message: str | None):
    result = run("install", "--dry-run", "--user", ME.pw_name, *args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    if message is not None:
        assert result.stderr == message


def test_uninstall_dry_run():
    result = run("uninstall", "--dry-run")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.splitlines() == [
        "launchctl bootout system/com.tbmesh.daemon",
        "# then would remove /Library/LaunchDaemons/com.tbmesh.daemon.plist",
    ]
    agent = run("uninstall", "--dry-run", "--user-agent")
    assert agent.returncode == 0
    assert agent.stdout.splitlines()[0] == f"launchctl bootout gui/{ME.pw_uid}/com.tbmesh.daemon"


@pytest.mark.skipif(sys.platform == "darwin", reason="the refusal is for machines without launchd")
def test_install_and_uninstall_refuse_off_macos(model_and_secret):
    model, _ = model_and_secret
    for args in (["install"], ["install", "--model", str(model), "--user", ME.pw_name], ["install", "--user-agent"]):
        result = run(*args)
        assert (result.returncode, result.stdout) == (2, "")
        assert result.stderr == "error: tbmesh install is for macOS (launchd); use --dry-run to see the plist and commands\n"
    for args in (["uninstall"], ["uninstall", "--user-agent"]):
        result = run(*args)
        assert (result.returncode, result.stdout) == (2, "")
        assert result.stderr == "error: tbmesh uninstall is for macOS (launchd); use --dry-run to see the commands\n"
    assert not (Path(ME.pw_dir) / "Library" / "LaunchAgents" / "com.tbmesh.daemon.plist").exists()


# --- the install steps, with a fake launchctl ----------------------------------------------


class FakeLaunchctl:
    """Records every command; answers with the exit statuses given per verb (one per call,
    the last repeated)."""

    def __init__(self, **answers: list[int]) -> None:
        self.answers = answers
        self.calls: list[list[str]] = []

    def __call__(self, args: list[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(args)
        verb = args[1]
        codes = self.answers.get(verb, [0])
        code = codes.pop(0) if len(codes) > 1 else codes[0]
        stderr = f"{verb.capitalize()} failed: {code}: Something\n" if code else ""
        return subprocess.CompletedProcess(args, code, "", stderr)


def service_in(tmp_path: Path, kind: str = DAEMON) -> Service:
    """A service whose plist, home and log are under tmp_path."""
    home = tmp_path / "home"
    home.mkdir()
    service = launchd.make_service(kind, ME.pw_name, TBMESH, ["--cluster", "lab"])
    return dataclasses.replace(service, home=home, plist_path=tmp_path / "LaunchDaemons" / f"{LABEL}.plist",
                               log_path=home / "Library" / "Logs" / "tbmesh" / "daemon.log")  # fmt: skip


def test_install_writes_the_plist_and_reloads_the_service(tmp_path: Path):
    service = service_in(tmp_path)
    # loaded before; gone at the first print; the first bootstrap hits launchd's EIO window
    fake = FakeLaunchctl(bootout=[0], print=[113], bootstrap=[5, 0])
    launchd.install(service, run=fake, wait_s=5)
    target = "system/com.tbmesh.daemon"
    assert fake.calls == [
        ["launchctl", "bootout", target],
        ["launchctl", "print", target],
        ["launchctl", "enable", target],
        ["launchctl", "bootstrap", "system", str(service.plist_path)],
        ["launchctl", "bootstrap", "system", str(service.plist_path)],
    ]
    assert plistlib.loads(service.plist_path.read_bytes()) == launchd.build_plist(service)
    assert stat.S_IMODE(service.plist_path.stat().st_mode) == 0o644
    assert service.log_path.is_file()  # launchd makes no directories


def test_install_when_not_loaded_does_not_wait(tmp_path: Path):
    fake = FakeLaunchctl(bootout=[3])  # "No such process": nothing to replace
    launchd.install(service_in(tmp_path), run=fake)
    assert [call[1] for call in fake.calls] == ["bootout", "enable", "bootstrap"]


def test_install_reports_a_failed_bootstrap(tmp_path: Path):
    fake = FakeLaunchctl(bootout=[3], bootstrap=[125])
    with pytest.raises(InstallError, match=r"launchctl bootstrap system .*: Bootstrap failed: 125"):
        launchd.install(service_in(tmp_path), run=fake, wait_s=5)
    assert [call[1] for call in fake.calls].count("bootstrap") == 1  # only EIO is retried


def test_uninstall_unloads_and_removes_the_plist(tmp_path: Path):
    service = service_in(tmp_path)
    launchd.install(service, run=FakeLaunchctl(bootout=[3]))
    fake = FakeLaunchctl()
    assert launchd.uninstall(service, run=fake) == (True, True)
    assert fake.calls == [["launchctl", "bootout", "system/com.tbmesh.daemon"]]
    assert not service.plist_path.exists()
    assert launchd.uninstall(service, run=FakeLaunchctl(bootout=[113])) == (False, False)
