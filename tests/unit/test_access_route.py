"""How hvctl reaches a VM's SSH: the jump through its host is the ssh that libvirt's qemu+ssh transport runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from hvctl.access import AccessError, Route, openssh_command, ssh_jump


def test_the_jump_is_the_uris_own_ssh_with_minus_w() -> None:
    uri = "qemu+ssh://root@198.18.1.2/system?command=/s/ssh"
    assert ssh_jump(uri, "127.0.0.1", 22201) == (
        "/s/ssh", "-W", "127.0.0.1:22201", "-o", "BatchMode=yes", "-l", "root", "-o", "StrictHostKeyChecking=yes",
        "--", "198.18.1.2")


def test_the_jump_carries_the_uris_user_port_key_and_known_hosts() -> None:
    uri = "qemu+ssh://ops@host.example:2222/system?keyfile=/k/id&known_hosts=/k/kh&no_tty=1"
    jump = ssh_jump(uri, "127.0.0.1", 22200)
    assert jump[0] == "ssh" and jump[-2:] == ("--", "host.example")
    flat = " ".join(jump)
    for part in ("-p 2222", "-l ops", "-i /k/id", "UserKnownHostsFile=/k/kh", "StrictHostKeyChecking=yes"):
        assert part in flat
    # no_verify=1 is libvirt's own opt-out of host key checking; the jump follows it rather than contradict it.
    assert "StrictHostKeyChecking=no" in ssh_jump("qemu+ssh://h/system?no_verify=1", "127.0.0.1", 1)


@pytest.mark.parametrize("uri", ["qemu+tls://h/system", "qemu+tcp://h/system", "qemu:///system"])
def test_a_host_reached_without_ssh_has_no_jump(uri: str) -> None:
    with pytest.raises(AccessError, match="no SSH to the host"):
        ssh_jump(uri, "127.0.0.1", 22200)


def test_the_printed_command_pins_the_vm_key_and_uses_the_same_jump(tmp_path: Path) -> None:
    from types import SimpleNamespace

    record = SimpleNamespace(name="web", host_pubkey="ssh-ed25519 AAAAC3Nz hvctl-host-web")
    jump = ssh_jump("qemu+ssh://root@198.18.1.2/system", "127.0.0.1", 22205)
    argv = openssh_command(record, Route("127.0.0.1", 22205, jump), tmp_path / "id", "root",  # type: ignore[arg-type]
                           tmp_path / "known_hosts")
    assert argv[0] == "ssh" and argv[-1] == "root@127.0.0.1"
    assert "HostKeyAlias=hvctl-web" in argv and "StrictHostKeyChecking=yes" in argv
    assert argv[argv.index("-p") + 1] == "22205"
    proxy = next(a for a in argv if a.startswith("ProxyCommand="))
    assert "-W 127.0.0.1:22205" in proxy and proxy.endswith("-- 198.18.1.2")
