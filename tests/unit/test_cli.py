"""The CLI contract for bad input: one line on stderr, a non-zero exit, no traceback, and nothing written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import short_tempdir


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """Shadows pytest's deep tmp_path: agent socket paths under the state dir must fit in 107 bytes."""
    path = short_tempdir("hvc-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def hvctl(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # A socket path that does not exist: any test that reached libvirt would fail loudly instead of passing.
    env = os.environ | {"HVCTL_STATE_DIR": str(state), "HVCTL_CONNECT": "qemu:///system?socket=/nonexistent",
                        "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "hvctl.cli", *args], capture_output=True, text=True, env=env,
                          timeout=60)


@pytest.mark.parametrize("args,needle", [
    (["create", "Bad;Name"], "name 'Bad;Name': must match"),
    (["create", "x$(reboot)"], "must match"),
    (["create", "ok", "--vcpus", "0"], "vcpus 0"),
    (["create", "ok", "--vcpus", "100000"], "vcpus 100000"),
    (["create", "ok", "--memory", "0"], "memory_mib 0"),
    (["create", "ok", "--memory", "99999999999"], "memory_mib"),
    (["create", "ok", "--disk", "0"], "disk_gib 0"),
    (["create", "ok", "--image", "../../etc/passwd"], "image"),
    (["create", "ok", "--tenant", "ACME"], "tenant"),
    (["create", "ok", "--ssh-bind", "127.0.0.1;reboot"], "ssh_bind"),
])
def test_bad_create_input_is_one_line_and_writes_nothing(tmp_path: Path, args: list[str], needle: str) -> None:
    state = tmp_path / "state"
    result = hvctl(state, *args)
    assert result.returncode == 2
    assert result.stderr.startswith("hvctl: error: invalid request") and needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert result.stdout == ""
    assert not state.exists(), "a refused request must not even create the state dir"


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    result = hvctl(tmp_path, "create")
    assert result.returncode == 2 and "Missing argument" in result.stderr


def test_unknown_vm_is_a_clear_error(tmp_path: Path) -> None:
    result = hvctl(tmp_path, "show", "nope")
    assert result.returncode == 3 and "no VM named 'nope'" in result.stderr and "Traceback" not in result.stderr


def test_unreachable_daemon_is_exit_5_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    plain = hvctl(tmp_path, "doctor")
    assert plain.returncode == 1 and "cannot reach libvirt" in plain.stdout
    listing = hvctl(tmp_path, "list")
    assert listing.returncode == 5 and listing.stderr.startswith("hvctl: error: host local: cannot reach libvirt")
    debug = hvctl(tmp_path, "--debug", "list", "--json")
    assert "unreachable_hosts" in debug.stdout


@pytest.mark.parametrize("args,code,needle", [
    (["serve", "nope", "status"], 3, "no VM named 'nope'"),
    (["serve", "nope", "start", "--model", "../etc"], 2, "give an absolute path in the guest"),
    (["serve", "nope", "start", "--model", "tiny-llm", "--name", "a b"], 2, "bad model name 'a b'"),
    (["serve", "nope", "start", "--model", "tiny-llm"], 3, "no VM named 'nope'"),
    (["serve", "nope", "start", "--model", "tiny-llm", "--max-seqs", "0"], 2, "--max-seqs"),
    (["generate", "nope", "--prompt", "hi"], 3, "no VM named 'nope'"),
    (["run", "nope", "train", "--objective", "rl", "--export", "/x"], 3, "no VM named 'nope'"),
])
def test_bad_serve_input_is_one_line(tmp_path: Path, args: list[str], code: int, needle: str) -> None:
    result = hvctl(tmp_path, *args)
    assert result.returncode == code and needle in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args,code,needle", [
    (["pause", "nope"], 3, "no VM named 'nope'"),
    (["resume", "nope"], 3, "no VM named 'nope'"),
    (["restart", "nope"], 3, "no VM named 'nope'"),
    (["wait", "nope", "--for", "coffee"], 2, "--for takes agent, ssh, stopped"),
    (["wait", "nope", "--for", "agent"], 3, "no VM named 'nope'"),
    (["exec", "nope", "--via", "telnet", "--", "true"], 2, "--via takes ssh or agent"),
    (["exec", "nope", "--agent", "--via", "ssh", "--", "true"], 2, "contradict"),
    (["exec", "nope", "--agent", "--timeout", "0", "--", "true"], 2, "--timeout"),
    (["exec", "nope", "--agent", "--", "true"], 3, "no VM named 'nope'"),
    (["snapshot", "create", "nope", "Bad Name"], 2, "invalid snapshot name 'Bad Name'"),
    (["snapshot", "create", "nope", "s1"], 3, "no VM named 'nope'"),
    (["snapshot", "revert", "nope", "s1"], 3, "no VM named 'nope'"),
    (["snapshot", "list", "nope"], 3, "no VM named 'nope'"),
    (["events", "--vm", "nope"], 3, "no VM named 'nope'"),
    (["host", "disable", "nope"], 3, "unknown host 'nope'"),
    (["list", "-o", "xml"], 2, "-o takes table|json|yaml|name"),
    (["resize", "nope", "--disk", "5"], 3, "no VM named 'nope'"),
    (["resize", "nope", "--vcpus", "0"], 3, "no VM named 'nope'"),
    (["list", "-o", "yaml", "--json"], 2, "contradict"),
    (["list", "--state", "asleep"], 2, "--state takes creating, running, paused, stopped, destroying"),
    (["show", "nope", "-o", "name"], 2, "-o takes table|json|yaml"),
    (["host", "evacuate", "nope"], 3, "unknown host 'nope'"),
    (["host", "prepare", "root@192.0.2.1", "--hugepages", "-1"], 2, "--hugepages"),
    (["metrics", "--listen", "9100"], 2, "--listen takes ADDRESS:PORT"),
    (["metrics", "--listen", "127.0.0.1:9100", "--textfile", "/tmp/x"], 2, "pick one"),
    (["run", "--vms", "a,b", "train"], 2, "a distributed job is `hvctl run --vms a,b[,c] train --distributed`"),
    (["run", "a", "train", "--distributed"], 2, "a distributed job is"),
    (["run", "--vms", "a,b", "train", "--distributed"], 3, "no VM named 'a'"),
    (["run", "a"], 2, "which workload?"),
])
def test_bad_lifecycle_input_is_one_line(tmp_path: Path, args: list[str], code: int, needle: str) -> None:
    result = hvctl(tmp_path, *args)
    assert result.returncode == code and needle in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_every_command(tmp_path: Path) -> None:
    result = hvctl(tmp_path, "--help")
    assert result.returncode == 0
    for command in ("create", "list", "show", "start", "stop", "destroy", "console-log", "doctor", "image",
                    "serve", "generate", "restart", "pause", "resume", "wait", "exec", "snapshot", "events", "metrics",
                    "config", "resize"):
        assert command in result.stdout


def test_connect_names_a_host_and_never_renames_local(tmp_path: Path) -> None:
    """-c URI picks the registered host with that URI. Pointing it at another daemon used to rewrite host `local`'s
    URI for good, after which destroy asked the wrong daemon and deleted a running VM's disk."""
    from hvctl.context import resolve_connect
    from hvctl.ledger import Ledger

    state = tmp_path / "state"
    env = os.environ | {"HVCTL_STATE_DIR": str(state), "COLUMNS": "200", "NO_COLOR": "1"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "hvctl.cli", *args], capture_output=True, text=True, env=env,
                              timeout=60)

    assert run("-c", "test:///default", "list", "--json").returncode == 0
    other = run("-c", "qemu+ssh://root@198.18.99.2/system", "list")
    assert other.returncode == 2 and "no registered host has that URI (host local is test:///default)" in other.stderr
    assert run("list", "--json").returncode == 0  # no -c: local, where the ledger says it is
    ledger = Ledger(state / "ledger.sqlite3")
    assert [(h.name, h.uri) for h in ledger.hosts.all()] == [("local", "test:///default")]
    ledger.hosts.ensure("h2", "qemu:///system?socket=/nonexistent")
    assert resolve_connect(ledger, "qemu:///system?socket=/nonexistent") == "h2"
    assert resolve_connect(ledger, None) == "local"
    ledger.close()


def test_an_unreachable_host_never_aborts_list_or_doctor_for_the_others(tmp_path: Path) -> None:
    """Host `gone` does not answer (its daemon's socket does not exist). `list` still lists host local's VM with
    its live state, shows gone's VM as unreachable and exits 5; `doctor` runs every check and names the host."""
    import json

    from hvctl.ledger import Ledger, VMPaths
    from hvctl.spec import VMSpec

    state = tmp_path / "state"
    env = os.environ | {"HVCTL_STATE_DIR": str(state), "HVCTL_CONNECT": "test:///default", "COLUMNS": "200",
                        "NO_COLOR": "1"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "hvctl.cli", *args], capture_output=True, text=True, env=env,
                              timeout=60)

    assert run("list").returncode == 0
    ledger = Ledger(state / "ledger.sqlite3")
    ledger.hosts.ensure("gone", "qemu:///system?socket=/nonexistent")
    for name, host in (("test", "local"), ("lost", "gone")):  # "test": the domain libvirt's test driver runs
        vm = tmp_path / name
        ledger.vms.reserve(VMSpec(name=name), host, VMPaths(vm / "b", vm / "o", vm / "s", vm / "c", vm / "a"))
        ledger.vms.set_state(name, "running")
    ledger.close()

    listing = run("list", "--json")
    assert listing.returncode == 5, listing.stderr
    assert listing.stderr.startswith("hvctl: error: host gone: cannot reach libvirt")
    views = {v["name"]: v for v in json.loads(listing.stdout)["vms"]}
    assert views["test"]["actual"] == "running" and views["test"]["drift"] is None
    assert views["lost"]["actual"] == "unreachable" and views["lost"]["drift"] == "host unreachable"
    table = run("list")
    assert "unreachable" in table.stdout and "running" in table.stdout

    doctor = run("doctor", "--json")
    assert doctor.returncode == 1 and "Traceback" not in doctor.stderr, doctor.stderr
    checks = {c["name"]: c for c in json.loads(doctor.stdout)}
    assert not checks["hosts"]["ok"] and checks["hosts"]["detail"].startswith("gone: cannot reach libvirt")
    assert {"libvirtd", "images", "enforcement", "gpu bindings", "drift"} <= set(checks)
    assert checks["gpu bindings"]["ok"] and "lost@gone: host unreachable" in checks["drift"]["detail"]


def test_the_config_file_sets_the_global_options_and_a_flag_or_variable_beats_it(tmp_path: Path) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text(f'state_dir = "{tmp_path / "from-file"}"\nwait = 5\n')
    env = {"HVCTL_CONFIG": str(conf)}

    def settings(*args: str, **extra: str) -> dict[str, tuple[object, str]]:
        result = hvctl_env(tmp_path, env | extra, *args, "config", "--json", drop_state=True)
        assert result.returncode == 0, result.stderr
        return {r["setting"]: (r["value"], r["from"]) for r in json.loads(result.stdout)["settings"]}

    got = settings()
    assert got["state_dir"] == (str(tmp_path / "from-file"), f"config file {conf}")
    assert got["wait"] == (5.0, f"config file {conf}") and got["policy"][1] == "default"
    assert settings("--wait", "2")["wait"] == (2.0, "flag")
    assert settings(HVCTL_STATE_DIR=str(tmp_path / "env"))["state_dir"] == (str(tmp_path / "env"), "environment")
    conf.write_text("statedir = '/x'\n")
    bad = hvctl_env(tmp_path, env, "list", drop_state=True)
    assert bad.returncode == 2 and "unknown setting 'statedir'" in bad.stderr and "Traceback" not in bad.stderr
    conf.write_text("wait = 'soon'\n")
    assert "is not a number" in hvctl_env(tmp_path, env, "list", drop_state=True).stderr
    missing = hvctl_env(tmp_path, {"HVCTL_CONFIG": str(tmp_path / "nope.toml")}, "list", drop_state=True)
    assert missing.returncode == 2 and "no such file" in missing.stderr
    assert not (tmp_path / "from-file").exists() and not (tmp_path / "env").exists()


def test_shell_completion_is_enabled(tmp_path: Path) -> None:
    # The shell named through click's own variable: `--show-completion` guesses it from the process tree, which
    # under some CI runners holds no shell at all.
    script = hvctl_env(tmp_path, {"_HVCTL_COMPLETE": "source_bash"})
    assert script.returncode == 0 and "_hvctl_completion" in script.stdout


def hvctl_env(state: Path, extra: dict[str, str], *args: str,
              drop_state: bool = False) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"HVCTL_STATE_DIR": str(state), "HVCTL_CONNECT": "qemu:///system?socket=/nonexistent",
                        "COLUMNS": "200", "NO_COLOR": "1"}
    if drop_state:
        env.pop("HVCTL_STATE_DIR")
    return subprocess.run([sys.executable, "-m", "hvctl.cli", *args], capture_output=True, text=True,
                          env=env | extra, timeout=60)


def test_one_invocation_builds_only_its_own_command() -> None:
    """typer builds click objects for the whole tree before running a command; main() hands it the named command
    alone. A global option's value is never taken for the command, and anything else gets the whole tree."""
    from hvctl.cli import _only_the_command, app

    def names(args: list[str]) -> set[str]:
        chosen = _only_the_command(args)
        return {c.name or c.callback.__name__ for c in chosen.registered_commands} | {
            g.name or "" for g in chosen.registered_groups}

    assert names(["list", "--json"]) == {"list"}
    assert names(["-c", "show", "--wait", "3", "list"]) == {"list"}
    assert names(["--debug", "host", "list"]) == {"host"}
    whole = names([])
    assert {"list", "show", "host", "serve"} <= whole
    for args in ([], ["--help"], ["nosuch"], ["--", "list"]):
        assert _only_the_command(args) is app
    assert app.registered_commands and len(whole) == len(names(["nosuch"]))


def test_list_reads_the_ledger_without_importing_pydantic(tmp_path: Path) -> None:
    """`hvctl list` parses no spec: the ledger's rows are read as they were written (the import alone cost more
    than the listing). The same numbers come out, and `show` still validates the spec."""
    from hvctl.ledger import Ledger, VMPaths
    from hvctl.spec import VMSpec

    state = tmp_path / "state"
    env = os.environ | {"HVCTL_STATE_DIR": str(state), "HVCTL_CONNECT": "test:///default"}
    assert hvctl_env(state, env, "list").returncode == 0  # registers host local
    ledger = Ledger(state / "ledger.sqlite3")
    vm = tmp_path / "test"
    ledger.vms.reserve(VMSpec(name="test", vcpus=2, memory_mib=768, disk_gib=3),
                      "local", VMPaths(vm / "b", vm / "o", vm / "s", vm / "c", vm / "a"))
    ledger.close()
    probe = ("import sys\nfrom hvctl.cli import main\ntry:\n    main(['list', '--json'])\nfinally:\n"
             "    sys.stderr.write('pydantic imported: %s' % ('pydantic' in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.endswith("pydantic imported: False")
    (view,) = json.loads(result.stdout)["vms"]
    assert (view["vcpus"], view["memory_mib"], view["disk_gib"]) == (2, 768, 3)
    assert view["spec"] == VMSpec(name="test", vcpus=2, memory_mib=768, disk_gib=3).model_dump(mode="json")
    shown = json.loads(hvctl_env(state, env, "show", "test", "--json").stdout)
    assert shown["spec"] == view["spec"]
    # show's typed detail writes the list's view of the VM and what only show tells.
    assert set(shown) == set(view) | {"events", "enforcement", "last_migration", "snapshots", "network", "operation"}
    assert shown["enforcement"]["error"] == "no local QEMU process found for this domain"  # test:///default's VM
    assert "vcpus" in hvctl_env(state, env, "show", "test").stdout


def test_every_error_has_its_own_exit_status_and_the_readme_table_is_the_codes() -> None:
    """Each HvctlError subclass's exit code is in hvctl.errors.EXIT_CODES under its own name, or is its parent's
    (a kind of that error); no two unrelated errors share one; the README's table is the one printed from it."""
    import importlib
    import pkgutil

    import hvctl
    from hvctl.errors import EXIT_CODES, HvctlError, exit_code_table

    for module in pkgutil.walk_packages(hvctl.__path__, "hvctl."):
        if module.name != "hvctl.cli.__main__":
            importlib.import_module(module.name)

    def every(cls: type[HvctlError]) -> list[type[HvctlError]]:
        return [cls] + [s for sub in cls.__subclasses__() for s in every(sub)]

    owners: dict[int, type[HvctlError]] = {}
    for cls in every(HvctlError):
        assert cls.exit_code in EXIT_CODES, f"{cls.__name__}: exit code {cls.exit_code} is not in EXIT_CODES"
        if "exit_code" in vars(cls):  # a code of its own, not its parent's
            assert cls.exit_code not in owners, f"{cls.__name__} and {owners[cls.exit_code].__name__} share " \
                                                f"exit code {cls.exit_code}"
            owners[cls.exit_code] = cls
            assert EXIT_CODES[cls.exit_code][0] == cls.__name__
    named = {code for code, (name, _) in EXIT_CODES.items() if name}
    assert named == set(owners), f"in the table but raised by no class: {named - set(owners)}"
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("<!-- exit-codes: begin -->\n", 1)[1].split("<!-- exit-codes: end -->", 1)[0]
    assert block == exit_code_table(), "README's exit-code table is stale: paste `python -m hvctl.errors`"
