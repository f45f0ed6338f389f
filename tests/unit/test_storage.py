"""A pool refresh while another command has a job in the pool. libvirt refuses to refresh a pool while a volume is
being built in it ("has asynchronous jobs running"): a window of a few milliseconds of another command's qemu-img or
truncate, which no test can hit on purpose. So that refusal is played by a stand-in for libvirt's pool handle (the
one fake here); everything else is libvirt's test driver."""

from __future__ import annotations

from collections.abc import Iterator

import libvirt
import pytest

from hvctl.errors import HypervisorError
from hvctl.host import storage
from hvctl.host.storage import Pool


class Refusing:
    """libvirt's handle on the test driver's pool, whose next ``refusals`` refreshes fail with ``message``."""

    def __init__(self, real: libvirt.virStoragePool, refusals: int,
                 message: str = "internal error: pool 'default-pool' has asynchronous jobs running.") -> None:
        self.real, self.refusals, self.message = real, refusals, message

    def refresh(self, flags: int) -> int:
        if self.refusals:
            self.refusals -= 1
            libvirt.virResetLastError()  # the error carries this message alone, as libvirt's own does
            raise libvirt.libvirtError(self.message)
        return int(self.real.refresh(flags))

    def __getattr__(self, attr: str) -> object:
        return getattr(self.real, attr)


@pytest.fixture
def conn(monkeypatch: pytest.MonkeyPatch) -> Iterator[libvirt.virConnect]:
    monkeypatch.setattr(storage, "BUSY_POLL_S", 0.0)
    c = libvirt.open("test:///default")
    yield c
    c.close()


def pool(conn: libvirt.virConnect, refusals: int, message: str | None = None) -> tuple[Pool, Refusing]:
    handle = Refusing(conn.storagePoolLookupByName("default-pool"), refusals, *([message] if message else []))
    return Pool(handle, conn, "test:///default", streams=False), handle


def test_a_refresh_waits_while_another_command_builds_a_volume_in_the_pool(conn: libvirt.virConnect) -> None:
    busy: list[int] = []
    p, handle = pool(conn, refusals=2)
    assert p.refresh(on_busy=lambda: busy.append(1)) is True
    assert busy == [1, 1] and handle.refusals == 0


def test_a_refresh_that_must_not_wait_says_it_did_not_refresh(conn: libvirt.virConnect) -> None:
    p, handle = pool(conn, refusals=1)
    assert p.refresh(wait=False) is False
    assert p.refresh(wait=False) is True and handle.refusals == 0


def test_a_pool_busy_for_too_long_or_another_failure_is_an_error(conn: libvirt.virConnect,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    p, _ = pool(conn, refusals=1, message="internal error: the disk is on fire")
    with pytest.raises(HypervisorError, match="refreshing pool default-pool failed: internal error: the disk is on"):
        p.refresh()
    monkeypatch.setattr(storage, "BUSY_WAIT_S", -1.0)
    p, _ = pool(conn, refusals=1)
    with pytest.raises(HypervisorError, match="pool default-pool stayed busy with another upload"):
        p.refresh()
