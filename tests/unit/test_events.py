"""The event stream (`hvctl events`): the ledger's rows and libvirt's domain events as one typed stream, and the
JSON each becomes. libvirt's real test driver delivers the domain events; its domain is the create path's own."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_gpu_create import Rig, _rig

from hvctl.ops.events import StreamEvent, follow, history


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    for made in _rig(tmp_path, None):  # destroys its VMs and removes its state dir at the end
        made.create("ev", gpus=0)
        yield made


def test_history_is_the_ledger_rows_and_each_writes_the_rows_json(rig: Rig) -> None:
    rig.ctx.ledger.events.log("ev", "local", "test.note", "a note", {"n": 1})
    past = history(rig.ctx, "ev", 50)
    assert past and all(e.source == "ledger" and e.vm == "ev" and e.id is not None for e in past)
    last = past[-1].as_json()
    assert last == {"id": past[-1].id, "ts": past[-1].ts, "vm": "ev", "host": "local", "kind": "test.note",
                    "message": "a note", "source": "ledger", "data": {"n": 1}}
    assert "data" not in past[0].as_json()  # a row without data has no key for it
    json.dumps([e.as_json() for e in past])


def test_follow_gives_the_past_then_libvirts_events_of_the_vm_as_they_come(rig: Rig) -> None:
    logged = len(history(rig.ctx, "ev", 50))  # create's own rows
    stop = threading.Event()
    guard = threading.Timer(60, stop.set)  # a hang guard only: the event below ends the test long before
    guard.start()
    try:
        stream = follow(rig.ctx, "ev", logged, stop=stop)
        past = [next(stream) for _ in range(logged)]
        assert logged >= 2 and [e.source for e in past] == ["ledger"] * logged
        # On the connection the follower watches (the test driver's state is per connection).
        rig.ctx.host("local").guest("ev").destroy()
        seen = next(e for e in stream if e.source == "libvirt")
    finally:
        stop.set()
        guard.cancel()
    assert seen.vm == "ev" and seen.host == "local" and seen.kind == "libvirt.stopped" and seen.id is None
    assert seen.as_json() == {"ts": seen.ts, "vm": "ev", "host": "local", "kind": "libvirt.stopped",
                              "message": seen.message, "source": "libvirt"}
    assert isinstance(seen, StreamEvent)
