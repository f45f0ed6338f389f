"""The workload output protocol (guest/workloads/protocol.py): what the guest writes, the controller reads back with
the same models, and nothing else in a log passes for an envelope."""

from __future__ import annotations

from pathlib import Path

import pytest

from guest.kinds import BAKED_MODELS, DEFAULT_LLM, PERCEPTION_MODEL
from guest.workloads.protocol import Ready, parse_progress, parse_ready, progress_line, ready_line
from guest.workloads.schema import TrainProgress
from hvctl.errors import ImageError
from images.recipe import load_recipe, shipped_recipe_names


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


def test_each_workload_error_has_an_exit_code_of_its_own() -> None:
    """The workload CLI's exit status: one meaning per code, declared on the error class; 0 is success and 2 the bad
    request (pydantic's refusal), so neither is an error class's. A subclass without a code of its own exits 1."""
    from guest.workloads import errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.WorkloadError)]
    assert len(classes) >= 7
    own = [(c.__name__, c.exit_code) for c in classes if c.exit_code != 1]
    assert len({code for _, code in own}) == len(own), own
    assert all(code not in (0, 2) for _, code in own)
    assert errors.UnsupportedModel.exit_code == 1 and errors.PromptTooLong.exit_code == 4


def test_the_baked_models_are_listed_once_and_a_recipe_naming_another_is_refused(tmp_path: Path) -> None:
    assert {DEFAULT_LLM, PERCEPTION_MODEL} <= set(BAKED_MODELS)
    assert all(set(load_recipe(name).models) <= set(BAKED_MODELS) for name in shipped_recipe_names())
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\nkind = "debootstrap"\nmodels = ["gpt-5"]\n')
    with pytest.raises(ImageError, match="unknown model 'gpt-5'; known: tiny-llm, perception"):
        load_recipe(str(bad))
