"""The host a guest is about to be put on, resolved once, before anything is written.

create, live and offline migration and checkpoint migration each put a guest on a host, and each needs the same
facts about it: its ledger record, a connection, its capabilities (probed the first time, which may boot a probe
domain there), whether it is the machine hvctl runs on, and what may be allocated there. ``Target.resolve``
gathers them in one place and in one order, refusing a disabled host before it connects; every later step reads
them from the ``Target`` instead of asking the ledger and the connection again.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from hvctl.context import Context
from hvctl.designer import HostCapabilities
from hvctl.host import Host
from hvctl.ledger import Admission, HostRecord
from hvctl.ledger.vms import PortCheck
from hvctl.placement import NoValidHost, host_limit
from hvctl.policy import Policy


@dataclass(frozen=True)
class Target:
    name: str
    record: HostRecord  # as probed: with its CPUs, memory, accelerator and disk size
    host: Host
    caps: HostCapabilities
    # The machine hvctl runs on: the guest's files go in the state dir and its SSH port is probed here. Any other
    # host keeps them in its storage pool, reached through libvirt alone.
    here: bool
    allowance: dict[str, float | None]  # what may be allocated there in all (placement.host_limit)

    @classmethod
    def resolve(cls, ctx: Context, name: str, hint: str | None = None) -> Target:
        """Host ``name`` as a place for a new guest (``of``); an unknown name is NotFound."""
        return cls.of(ctx, ctx.ledger.hosts.get(name), hint)

    @classmethod
    def of(cls, ctx: Context, record: HostRecord, hint: str | None = None) -> Target:
        """The host ``record`` names as a place for a new guest. A disabled host is refused before any connection
        is made (NoValidHost; ``hint`` says what the command's user may do instead); a host never asked before is
        probed."""
        name = record.name
        if not record.enabled:
            raise NoValidHost(f"host {name} is disabled: nothing new is placed there",
                              hint=hint or f"`hvctl host enable {name}` first")
        record = ctx.probed(record)
        gpus = len(ctx.ledger.hosts.hardware(name).gpus)
        return cls(name, record, ctx.host(name), ctx.capabilities_of(record), ctx.is_this_machine(name),
                   host_limit(ctx.policy, record, gpus))

    def port_check(self, address: str) -> PortCheck | None:
        """How the ledger learns whether a port is free for a forward on ``address`` there: by binding it, on this
        machine; on another host nothing here can tell (its QEMU refuses a taken port at start, and the boot moves
        the forward)."""
        return bindable_here(address) if self.here else None

    def admission(self, policy: Policy, tenant: str) -> Admission:
        """The limits a new allocation of ``tenant`` here is admitted against, inside the ledger's transaction."""
        return Admission(tenant_limit=policy.tenant(tenant).quota.model_dump(), host_limit=self.allowance)


def bindable_here(address: str) -> PortCheck:
    """Whether a port can be bound on ``address`` on this machine now (nothing else listens there)."""
    def free(port: int) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((address, port))
            except OSError:
                return False
        return True

    return free
