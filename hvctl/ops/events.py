"""hvctl events: the ledger's event log, and with ``follow`` libvirt's domain events from every host as they come.

The ledger's log is what hvctl did and decided (state changes, admissions, migration progress, GPU bindings);
libvirt's events are what the hypervisor saw, including what happened behind hvctl's back (a guest that rebooted
or powered itself off, a disk I/O error). Both are printed in one stream, each marked with its source.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from hvctl.context import Context
from hvctl.errors import HostUnreachable
from hvctl.host import DomainEvent
from hvctl.ledger import Event

# How often a follower asks the ledger for rows written by other processes.
LEDGER_POLL_S = 0.5


@dataclass(frozen=True)
class StreamEvent:
    """One event of the stream: a ledger row (``source`` "ledger": what hvctl did, with its row ``id`` and maybe
    ``data``) or a libvirt domain event (``source`` "libvirt": what the hypervisor saw)."""

    ts: float
    vm: str | None
    host: str | None
    kind: str
    message: str
    source: Literal["ledger", "libvirt"]
    id: int | None = None
    data: dict[str, Any] | None = None

    @classmethod
    def of_ledger(cls, event: Event) -> StreamEvent:
        return cls(event.ts, event.vm, event.host, event.kind, event.message, "ledger", event.id, event.data)

    @classmethod
    def of_libvirt(cls, event: DomainEvent, host: str) -> StreamEvent:
        return cls(event.ts, event.vm, host, event.kind, event.message, "libvirt")

    def as_json(self) -> dict[str, Any]:
        """A ledger event as the ledger's row (its id and data, if any); a libvirt one without either."""
        if self.source == "ledger":
            return {"id": self.id, "ts": self.ts, "vm": self.vm, "host": self.host, "kind": self.kind,
                    "message": self.message, "source": "ledger"} | ({"data": self.data} if self.data else {})
        return {"ts": self.ts, "vm": self.vm, "host": self.host, "kind": self.kind, "message": self.message,
                "source": "libvirt"}


def history(ctx: Context, vm: str | None, limit: int) -> list[StreamEvent]:
    if vm is not None:
        ctx.ledger.vms.get(vm)  # NotFound for a VM that never was, rather than an empty list
    return [StreamEvent.of_ledger(e) for e in ctx.ledger.events.recent(vm, limit)]


def follow(ctx: Context, vm: str | None, limit: int, stop: threading.Event | None = None,
           on_problem: Callable[[str], None] = lambda _: None) -> Iterator[StreamEvent]:
    """The last ``limit`` ledger events, then every new one and every libvirt domain event of the ledger's VMs
    (or of ``vm``) on every registered host, until ``stop`` is set. A host that cannot be watched is reported
    through ``on_problem`` and the others are still followed."""
    stop = stop or threading.Event()
    if vm is not None:
        ctx.ledger.vms.get(vm)
    incoming: queue.Queue[DomainEvent] = queue.Queue()
    watchers = []
    for host in ctx.ledger.hosts.all():
        try:
            watchers.append(ctx.host(host.name).watch_domain_events(incoming.put))
        except HostUnreachable as exc:
            on_problem(f"host {host.name}: {exc.message}; its libvirt events are not followed")
    names = {h.uri: h.name for h in ctx.ledger.hosts.all()}
    try:
        last = 0
        for event in ctx.ledger.events.recent(vm, limit):
            last = event.id
            yield StreamEvent.of_ledger(event)
        next_poll = time.monotonic() + LEDGER_POLL_S
        known = {r.name for r in ctx.ledger.vms.all()}
        while not stop.is_set():
            try:
                seen = incoming.get(timeout=max(0.0, min(next_poll - time.monotonic(), LEDGER_POLL_S)))
                if seen.vm == vm or (vm is None and seen.vm in known):
                    yield StreamEvent.of_libvirt(seen, names.get(seen.uri, seen.uri))
            except queue.Empty:
                pass
            if time.monotonic() >= next_poll:
                for event in ctx.ledger.events.recent(vm, 10_000, after=last):
                    last = event.id
                    yield StreamEvent.of_ledger(event)
                # A VM created since the follower started counts too; one destroyed keeps its last events.
                known |= {r.name for r in ctx.ledger.vms.all()}
                next_poll = time.monotonic() + LEDGER_POLL_S
    finally:
        for unsubscribe in watchers:
            unsubscribe()
