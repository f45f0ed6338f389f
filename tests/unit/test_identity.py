"""Host identity: "this machine" comes from the URI's transport and libvirt's host UUID, not a name's spelling."""

from __future__ import annotations

from pathlib import Path

import libvirt
import pytest

from hvctl.host import identity


@pytest.mark.parametrize(("uri", "local"), [
    ("qemu:///system", True),
    ("qemu:///system?socket=/var/tmp/hvd-x/run/libvirt/libvirt-sock", True),
    ("qemu+unix:///system?socket=/x", True),
    ("test:///default", True),
    ("qemu+ssh://localhost/system", False),  # localhost over ssh: only its UUID can say
    ("qemu+ssh://root@127.0.0.1/system", False),
    ("qemu+tcp://127.0.0.1:16509/system", False),
    ("qemu://far.example/system", False),  # no transport named: TLS to far.example
    ("qemu+ssh://root@198.18.1.2/system?keyfile=/k", False),
])
def test_only_transports_that_cannot_leave_the_machine_count_without_asking(uri: str, local: bool) -> None:
    assert identity.needs_no_network(uri) is local


def test_a_networked_uri_is_this_machine_only_when_its_libvirt_reports_one_of_our_uuids(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    conn = libvirt.open("test:///default")
    try:
        theirs = identity.host_uuid(conn)
        machine_id = tmp_path / "machine-id"
        machine_id.write_text("3d1219c7c4c5404aaa1f6d2a48adfda4\n")
        monkeypatch.setattr(identity, "_MACHINE_ID", machine_id)
        monkeypatch.setattr(identity, "_SMBIOS_UUID", tmp_path / "absent")
        assert identity.machine_uuids() == {"3d1219c7-c4c5-404a-aa1f-6d2a48adfda4"}
        uri = "qemu+ssh://localhost/system"
        assert not identity.is_this_machine(uri, conn)
        assert identity.is_this_machine(uri, conn, [theirs])  # the same daemon as one reached over a unix socket
        machine_id.write_text(theirs.replace("-", "") + "\n")
        assert identity.is_this_machine(uri, conn)  # the UUID libvirt derives from /etc/machine-id
    finally:
        conn.close()
