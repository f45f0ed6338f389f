"""A training workload's progress as its agent reports it: what a checkpoint migration waits on and checks."""

from __future__ import annotations

import time
from collections.abc import Callable

from guest import rpc
from guest.workloads.protocol import parse_progress
from guest.workloads.schema import TrainProgress
from hvctl.agent_client import AgentClient
from hvctl.errors import GuestTimeout, MigrationFailed


class CheckpointMigrationFailed(MigrationFailed):
    """A step of a checkpoint migration failed; ``migrate`` reports it as the migration's failure."""


def progress(agent: AgentClient, wid: str, offset: int) -> tuple[list[TrainProgress], int, bool]:
    """The workload's ``{"progress": ...}`` lines from ``offset``, the next offset, and whether it has ended."""
    logs = agent.typed("workload.logs", rpc.WorkloadLogs, rpc.WorkloadLogsParams(id=wid, offset=offset))
    complete = logs.data[: logs.data.rfind("\n") + 1]  # a line still being written is read next time
    return parse_progress(complete), offset + len(complete.encode()), logs.eof


def wait_for_progress(agent: AgentClient, wid: str, offset: int, deadline: float,
                      match: Callable[[TrainProgress], bool], what: str) -> tuple[TrainProgress, int]:
    """The first progress event from ``offset`` on that ``match``es, and the offset to read on from."""
    while True:
        start = offset
        events, offset, ended = progress(agent, wid, offset)
        for i, event in enumerate(events):
            if match(event):
                return event, start if i + 1 < len(events) else offset
        if ended:
            status = agent.typed("workload.status", rpc.WorkloadStatus, rpc.WorkloadRef(id=wid))
            raise CheckpointMigrationFailed(f"workload {wid} ended ({status.state}: {status.error}) before "
                                            f"{what}")
        if time.monotonic() > deadline:
            raise GuestTimeout(f"workload {wid} did not report {what} within the migration's timeout")
        time.sleep(0.5)


def wait_until(done: Callable[[], bool], deadline: float, what: str, poll: float = 0.5) -> None:
    """Poll ``done`` until it holds; GuestTimeout ("``what`` within the migration's timeout") past ``deadline``."""
    while not done():
        if time.monotonic() > deadline:
            raise GuestTimeout(f"{what} within the migration's timeout")
        time.sleep(poll)
