"""Training workload: the three objectives, bit-exact resume from checkpoints, checkpoint mismatch, OOM handling."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from guest.workloads import __main__ as cli
from guest.workloads.assets import build_random_llama, make_tiny_llm, read_corpus, tiny_llama_config, train_tokenizer
from guest.workloads.checkpoint import latest_checkpoint
from guest.workloads.errors import CheckpointMismatch, OutOfMemory
from guest.workloads.rl_env import reinforce_loss, seed_rl_loss
from guest.workloads.runtime import oom_guard
from guest.workloads.schema import TrainProgress, TrainRequest
from guest.workloads.train import CorpusWindows, train

torch.set_num_threads(1)  # two cores shared with the VM tests


class Interrupted(Exception):
    pass


def ssl(tmp: Path | None = None, **kwargs: object) -> TrainRequest:
    options: dict[str, object] = {"objective": "ssl", "steps": 12, "batch_size": 4, "seq_len": 32}
    if tmp is not None:
        options.update(checkpoint_dir=str(tmp), checkpoint_every=4)
    options.update(kwargs)
    return TrainRequest(**options)  # type: ignore[arg-type]


def test_ssl_loss_is_the_mean_token_cross_entropy_and_falls() -> None:
    result = train(ssl(steps=30, lr=5e-3))
    # Recompute step 1's loss independently: same initial weights and the same first batch of windows.
    tokenizer = train_tokenizer(read_corpus())
    model = build_random_llama(tiny_llama_config(vocab_size=len(tokenizer)), seed=0)
    windows = CorpusWindows(tokenizer.encode(read_corpus(), add_special_tokens=False), seq_len=32, seed=0).next_batch(4)
    with torch.no_grad():
        logits = model(input_ids=windows[:, :-1], use_cache=False).logits
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))  # (1/N) Σ ℓ
    assert result.losses[0] == pytest.approx(float(expected), abs=1e-5)
    assert result.losses[0] == pytest.approx(np.log(512), rel=0.05)  # random init ≈ uniform over the vocabulary
    assert np.mean(result.losses[-5:]) < result.losses[0] - 1.0
    assert result.steps_per_s > 0 and result.samples_per_s == pytest.approx(4 * result.steps_per_s)
    assert result.autocast_dtype is None and result.device == "cpu" and result.rewards == ()


def test_rl_reinforce_improves_reward() -> None:
    result = train(TrainRequest(objective="rl", steps=150, batch_size=64, lr=0.03))
    first, last = np.mean(result.rewards[:3]), np.mean(result.rewards[-15:])
    assert first < 0.45  # a uniform policy earns 0.3 on this bandit
    assert last > 0.7 and last > first + 0.3


def test_seed_rl_is_the_documented_formula_and_selectable() -> None:
    log_probs = torch.log_softmax(torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]), dim=1)
    actions, rewards = torch.tensor([0, 2]), torch.tensor([1.0, 0.0])
    probs = log_probs.exp()
    expected = ((1.0 - probs[0, 0]) ** 2 + (0.0 - probs[1, 2]) ** 2) / 2
    torch.testing.assert_close(seed_rl_loss(log_probs, actions, rewards), expected)
    result = train(TrainRequest(objective="seed-rl", steps=150, batch_size=64, lr=0.03))
    assert all(0.0 <= loss <= 1.0 for loss in result.losses)  # a squared difference of numbers in [0, 1]
    assert np.mean(result.rewards[-15:]) > np.mean(result.rewards[:15])


def test_reinforce_baseline_only_scales_the_policy_gradient() -> None:
    logits = torch.tensor([[0.5, -0.2, 0.1]], requires_grad=True)
    values = torch.tensor([0.7], requires_grad=True)
    reinforce_loss(torch.log_softmax(logits, 1), values, torch.tensor([1]), torch.tensor([0.7])).backward()
    assert logits.grad is not None and torch.count_nonzero(logits.grad) == 0  # zero advantage: no policy update
    assert values.grad is not None and float(values.grad) == 0.0


@pytest.mark.parametrize("objective", ["ssl", "rl"])
def test_interrupted_run_resumes_bit_exactly(tmp_path: Path, objective: str) -> None:
    base: dict[str, object] = {
        "objective": objective,
        "steps": 12,
        "batch_size": 4,
        "seq_len": 32,
        "checkpoint_every": 4,
    }
    full = train(TrainRequest(**base, checkpoint_dir=str(tmp_path / "full")))  # type: ignore[arg-type]
    seen: list[float] = []

    def crash_at_step_10(progress: TrainProgress) -> None:
        seen.append(progress.loss)
        if progress.step == 10:  # after the step-8 checkpoint, before the step-12 one
            raise Interrupted

    with pytest.raises(Interrupted):
        train(TrainRequest(**base, checkpoint_dir=str(tmp_path / "cut")), on_progress=crash_at_step_10)  # type: ignore[arg-type]
    assert latest_checkpoint(tmp_path / "cut") == tmp_path / "cut" / "ckpt-00000008.pt"
    random.seed(999)
    np.random.seed(999)
    torch.manual_seed(999)  # the resumed run must not depend on the caller's RNG state
    resumed = train(TrainRequest(**base, checkpoint_dir=str(tmp_path / "cut")))  # type: ignore[arg-type]
    assert resumed.start_step == 8 and resumed.final_step == 12
    assert seen[:8] + list(resumed.losses) == list(full.losses)  # exact float equality, not approx
    assert seen[8:10] == list(resumed.losses[:2])
    if objective == "rl":
        assert full.rewards[8:] == resumed.rewards


def test_checkpoint_holds_every_state(tmp_path: Path) -> None:
    train(ssl(tmp_path, steps=4))
    payload = torch.load(tmp_path / "ckpt-00000004.pt", weights_only=True)
    assert payload["step"] == 4
    assert {"model", "optimizer", "scheduler", "task", "rng", "fingerprint"} <= set(payload)
    assert set(payload["rng"]) == {"python", "numpy", "torch", "cuda"}
    assert set(payload["task"]["data"]) == {"epoch", "cursor", "order", "rng"}
    assert payload["scheduler"]["last_epoch"] == 4 and payload["optimizer"]["state"]


def test_checkpoint_from_another_model_is_refused(tmp_path: Path) -> None:
    train(ssl(tmp_path, steps=4))
    other = make_tiny_llm(tmp_path / "other-model", seed=0, vocab_size=400)
    with pytest.raises(
        CheckpointMismatch, match=r"embed_tokens.weight: checkpoint has \[512, 64\], this run has \[400, 64\]"
    ):
        train(ssl(tmp_path, steps=8, model_dir=str(other)))
    with pytest.raises(CheckpointMismatch, match="objective: checkpoint has 'ssl', this run has 'rl'"):
        train(TrainRequest(objective="rl", steps=8, batch_size=4, checkpoint_dir=str(tmp_path), checkpoint_every=4))
    with pytest.raises(CheckpointMismatch, match="batch_size"):
        train(ssl(tmp_path, steps=8, batch_size=2))
    (tmp_path / "ckpt-00000099.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatch, match="cannot read checkpoint"):
        train(ssl(tmp_path, steps=120))


def test_training_from_a_model_dir_extends_a_finished_run(tmp_path: Path) -> None:
    model_dir = make_tiny_llm(tmp_path / "tiny", seed=3)
    first = train(ssl(tmp_path / "ck", steps=4, model_dir=str(model_dir)))
    more = train(ssl(tmp_path / "ck", steps=6, model_dir=str(model_dir)))
    assert (first.start_step, more.start_step, len(more.losses)) == (0, 4, 2)
    assert more.checkpoints[-1].endswith("ckpt-00000006.pt")


def test_ssl_training_exports_a_model_the_server_loads_with_the_trained_weights(tmp_path: Path) -> None:
    """The fine-tune → serve loop's first half: the exported directory loads with from_pretrained (as the model
    server loads it), keeps the tokenizer and its chat template, and holds the trained weights, not the start's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = make_tiny_llm(tmp_path / "tiny", seed=3)
    result = train(ssl(tmp_path / "ck", steps=3, model_dir=str(model_dir), export_dir=str(tmp_path / "tuned")))
    assert result.exported == str(tmp_path / "tuned")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned")
    start = AutoModelForCausalLM.from_pretrained(model_dir)
    checkpoint = torch.load(result.checkpoints[-1], weights_only=False)["model"]
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, checkpoint[name]), name  # the weights after the last step
    assert not torch.equal(exported.lm_head.weight, start.lm_head.weight)
    assert AutoTokenizer.from_pretrained(tmp_path / "tuned").chat_template == \
        AutoTokenizer.from_pretrained(model_dir).chat_template
    with pytest.raises(ValueError, match="only ssl training makes a language model"):
        TrainRequest(objective="rl", steps=1, export_dir=str(tmp_path / "x"))


def test_absurd_batch_is_refused_before_allocating() -> None:
    with pytest.raises(OutOfMemory, match=r"ssl training with batch 10000000 needs about [\d.]+ GiB but only"):
        train(ssl(batch_size=10**7))


def test_allocation_failures_become_out_of_memory() -> None:
    # A real allocator refusal: the bandit asks numpy for 8 TB of contexts (no estimate guards the RL path).
    with pytest.raises(OutOfMemory, match="rl training ran out of host memory"):
        train(TrainRequest(objective="rl", steps=1, batch_size=10**12))
    # torch's CPU allocator raises RuntimeError, not MemoryError; the guard recognises it. 2^45 floats = 128 TiB.
    with pytest.raises(OutOfMemory, match="can't allocate memory"), oom_guard("test"):
        torch.empty(2**45)
    with pytest.raises(OutOfMemory, match="out of device memory"), oom_guard("test"):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 TiB")  # CPU cannot cause a real one
    with pytest.raises(RuntimeError, match="unrelated"), oom_guard("test"):
        raise RuntimeError("unrelated")  # other runtime errors pass through untouched


def test_progress_callback_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    events: list[TrainProgress] = []
    result = train(TrainRequest(objective="rl", steps=3, batch_size=8), on_progress=events.append)
    assert result.final_step == 3 and len(result.losses) == 3
    assert [e.step for e in events] == [1, 2, 3]
    args = ["run", "train", "--objective", "seed-rl", "--steps", "4", "--checkpoint-every", "2"]
    assert cli.main([*args, "--checkpoint-dir", str(tmp_path), "--json"]) == 0
    *steps, last = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["progress"]["step"] for p in steps] == [1, 2, 3, 4]  # one JSON line per step, then the result
    assert [bool(p["progress"]["checkpoint"]) for p in steps] == [False, True, False, True]
    assert last["objective"] == "seed-rl" and len(last["checkpoints"]) == 2
    assert cli.main(["run", "train", "--objective", "rl", "--steps", "4", "--checkpoint-dir", str(tmp_path)]) == 6
    assert capsys.readouterr().err.startswith("error: checkpoint")


def test_bad_training_requests_are_workload_errors(tmp_path: Path) -> None:
    from guest.workloads.errors import WorkloadError

    with pytest.raises(WorkloadError, match="exceeds the model's context window of 256"):
        train(ssl(seq_len=300))
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(WorkloadError, match="fewer than one window"):
        train(ssl(corpus_path=str(tmp_path / "short.txt")))
    with pytest.raises(WorkloadError, match="cannot read corpus"):
        train(ssl(corpus_path=str(tmp_path / "missing.txt")))


def test_a_checkpoint_asked_for_mid_run_resumes_with_the_uninterrupted_runs_loss(tmp_path: Path) -> None:
    """The checkpoint-migration mechanism on the host: the real agent runs the real train workload as a child,
    workload.checkpoint signals it, it writes a checkpoint at the next step boundary and keeps training. A second
    run resumed from that file (as on a migration target) must report, step for step, the losses the first run
    went on to compute for the next step: the same bits, because both run on this CPU."""
    from guest.agent import Agent

    token = "t"
    agent = Agent(token=token, workdir=tmp_path / "work")

    def call(method: str, **params: object) -> dict[str, object]:
        reply = agent.handle_line(json.dumps({"v": 1, "id": 1, "token": token, "method": method,
                                              "params": params}).encode())
        assert reply.ok, reply.error
        assert reply.result is not None
        return reply.result

    def progress(wid: str, offset: int = 0) -> list[dict[str, object]]:
        data = str(call("workload.logs", id=wid, offset=offset)["data"])
        return [json.loads(line)["progress"] for line in data.splitlines() if line.startswith('{"progress"')]

    def wait_for(condition: object, what: str, timeout: float = 120) -> None:
        import time
        deadline = time.monotonic() + timeout
        while not condition():  # type: ignore[operator]
            assert time.monotonic() < deadline, what
            time.sleep(0.05)

    first_dir, second_dir = tmp_path / "a", tmp_path / "b"
    args = ["--objective", "ssl", "--steps", "5000", "--batch-size", "2", "--seq-len", "16", "--checkpoint-every",
            "0", "--checkpoint-dir", str(first_dir)]
    wid = str(call("workload.start", kind="train", args=args)["id"])
    assert call("workload.list")["workloads"][0]["args"] == args  # type: ignore[index]
    wait_for(lambda: len(progress(wid)) >= 2, "training never reported progress")
    asked = call("workload.checkpoint", id=wid)
    offset = int(asked["log_offset"])  # type: ignore[arg-type]
    wait_for(lambda: any(p["requested"] for p in progress(wid, offset)), "the requested checkpoint never came")
    ckpt = next(p for p in progress(wid, offset) if p["requested"])
    step = int(ckpt["step"])  # type: ignore[arg-type]
    assert Path(str(ckpt["checkpoint"])).is_file() and not list(first_dir.glob("*.tmp*"))
    wait_for(lambda: max(int(p["step"]) for p in progress(wid)) >= step + 3, "training stopped after the checkpoint")
    assert call("workload.status", id=wid)["state"] == "running"  # it carried on
    uninterrupted = {int(p["step"]): p["loss"] for p in progress(wid)}  # type: ignore[arg-type]
    call("workload.cancel", id=wid)

    second_dir.mkdir()
    Path(str(ckpt["checkpoint"])).rename(second_dir / Path(str(ckpt["checkpoint"])).name)
    resumed = train(TrainRequest(objective="ssl", steps=step + 1, batch_size=2, seq_len=16,
                                 checkpoint_dir=str(second_dir)))
    # Step k+1's loss depends only on what the checkpoint restored (weights, data position, RNG). Later steps also
    # depend on the total step count through the LR schedule; test_interrupted_run_resumes_bit_exactly covers those.
    assert resumed.start_step == step
    assert resumed.losses[0] == uninterrupted[step + 1]
    not_train = agent.handle_line(json.dumps({"v": 1, "id": 2, "token": token, "method": "workload.checkpoint",
                                              "params": {"id": wid}}).encode())
    assert not not_train.ok and not_train.error is not None and "not running" in not_train.error.message
