"""The workload output protocol (guest/workloads/protocol.py): what the guest writes, the controller reads back with
the same models, and nothing else in a log passes for an envelope."""

from __future__ import annotations

from guest.workloads.protocol import Ready, parse_progress, parse_ready, progress_line, ready_line
from guest.workloads.schema import TrainProgress


def test_envelopes_round_trip_and_everything_else_in_a_log_is_skipped() -> None:
    steps = [TrainProgress(step=1, loss=2.5, lr=1e-3), TrainProgress(step=2, loss=2.25, lr=1e-3, rank=1, world_size=3,
                                                                     checkpoint="/c/ckpt-00000002.pt")]
    log = "\n".join([
        "W1206 21:10:46 torch/distributed/elastic/rendezvous/dynamic_rendezvous.py:1346] a warning",
        ready_line(Ready(interface="eth1", address="10.96.30.2")),
        progress_line(steps[0]),
        '{"progress": {"step": "three"}}',  # not a TrainProgress
        '{"progress": {"step": 3, "loss": 1.0, "lr": 0.1}, "extra": 1}',  # not an envelope: a second key
        '{"progress": ',  # cut short
        "[rank0]: Traceback (most recent call last):",
        progress_line(steps[1]),
        '{"objective": "ssl", "final_step": 2}',  # the result line
    ])
    assert parse_progress(log) == steps
    assert parse_ready(log) == Ready(interface="eth1", address="10.96.30.2")
    assert parse_ready(progress_line(steps[0])) is None


def test_every_kind_has_one_workload_parser_and_handler_and_the_agent_starts_each() -> None:
    from guest.agent import DEFAULT_WORKLOADS
    from guest.kinds import KINDS
    from guest.workloads.__main__ import HANDLERS, _parser

    run = next(a for a in _parser()._subparsers._group_actions if a.dest == "command").choices["run"]  # type: ignore[union-attr]
    parsers = next(a for a in run._subparsers._group_actions if a.dest == "workload").choices  # type: ignore[union-attr]
    assert set(parsers) == set(HANDLERS) == set(KINDS) == set(DEFAULT_WORKLOADS)
    assert DEFAULT_WORKLOADS["train-ddp"](["--x"])[-4:] == ["run", "train-ddp", "--x", "--json"]
