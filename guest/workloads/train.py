"""Training workloads with resumable, bit-exact checkpoints.

Objectives:
- ``ssl``: causal LM on the local corpus, L_unsup = (1/N)·Σ ℓ(M_θ(x_i), y_i) with ℓ the token cross-entropy, x_i a
  window of the corpus and y_i the same window shifted by one token; N counts every predicted token of the batch.
- ``rl``: REINFORCE with a learned state-value baseline on a contextual bandit (``rl_env``).
- ``seed-rl``: the vision document's formula as written, L_RL = (1/N)·Σ (r_i − π(a_i|s_i))², on the same bandit.
  It is kept selectable because the document specifies it; it is a regression of π onto r, not a policy gradient
  (see ``rl_env.seed_rl_loss``).

Determinism: a fresh run seeds python/numpy/torch from ``seed``; a resumed run restores every RNG, the data position,
model, optimizer and scheduler from the checkpoint, so on CPU its losses equal the uninterrupted run's bit for bit.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .assets import build_random_llama, read_corpus, save_llm, tiny_llama_config, train_tokenizer
from .checkpoint import (
    capture_rng,
    checkpoint_path,
    isolated_global_rng,
    latest_checkpoint,
    load_checkpoint,
    model_fingerprint,
    restore_rng,
    save_checkpoint,
)
from .errors import WorkloadError
from .llm import load_model
from .rl_env import ContextualBandit, Policy, reinforce_loss, seed_rl_loss
from .runtime import oom_guard, require_memory, resolve_device
from .schema import TrainProgress, TrainRequest, TrainResult

ProgressCallback = Callable[[TrainProgress], None]


class Task(Protocol):
    """What the training loop needs from an objective."""

    model: nn.Module

    def loss(self, autocast: bool) -> tuple[torch.Tensor, float | None]: ...  # (loss, mean reward or None)
    def state(self) -> dict[str, Any]: ...
    def load_state(self, state: dict[str, Any]) -> None: ...


class CorpusWindows:
    """Non-overlapping (seq_len + 1)-token windows of the corpus, visited in a fresh random order each epoch.

    Its position (epoch, cursor, order) and shuffling RNG are part of the checkpoint: the "data position".
    """

    def __init__(self, token_ids: list[int], seq_len: int, seed: int) -> None:
        width = seq_len + 1
        count = len(token_ids) // width
        if count < 1:
            raise WorkloadError(f"the corpus has {len(token_ids)} tokens, fewer than one window of {width}")
        self.windows = torch.tensor(token_ids[: count * width], dtype=torch.long).view(count, width)
        self.rng = np.random.default_rng(seed)
        self.epoch, self.cursor = 0, 0
        self.order = self.rng.permutation(count).tolist()

    def next_batch(self, batch_size: int) -> torch.Tensor:
        rows: list[int] = []
        while len(rows) < batch_size:
            if self.cursor == len(self.order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self.order = self.rng.permutation(len(self.order)).tolist()
            take = min(batch_size - len(rows), len(self.order) - self.cursor)
            rows += self.order[self.cursor : self.cursor + take]
            self.cursor += take
        return self.windows[rows]

    def state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "order": list(self.order),
            "rng": self.rng.bit_generator.state,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.epoch, self.cursor, self.order = int(state["epoch"]), int(state["cursor"]), list(state["order"])
        self.rng.bit_generator.state = state["rng"]


class CausalLMTask:
    def __init__(self, request: TrainRequest, device: torch.device) -> None:
        try:
            corpus = read_corpus(request.corpus_path)
        except (OSError, UnicodeDecodeError) as error:
            raise WorkloadError(f"cannot read corpus {request.corpus_path}: {error}") from error
        if request.model_dir is not None:
            loaded = load_model(request.model_dir, torch.device("cpu"))
            model: Any = loaded.model.float()  # type: ignore[no-untyped-call]  # fp32 master weights; autocast does bf16
            tokenizer = loaded.tokenizer
        else:
            tokenizer = train_tokenizer(corpus)
            model = build_random_llama(tiny_llama_config(vocab_size=len(tokenizer)), request.seed)
        context = int(model.config.max_position_embeddings)
        if request.seq_len > context:
            raise WorkloadError(f"seq_len {request.seq_len} exceeds the model's context window of {context} tokens")
        require_memory(_ssl_memory_estimate(model, request), f"ssl training with batch {request.batch_size}", device)
        self.model: nn.Module = model.to(device).train()
        self.forward: nn.Module = self.model  # the DDP wrapper of model in a distributed run
        self.rows = slice(None)  # this rank's rows of each global batch (all of them when not distributed)
        self.tokenizer = tokenizer
        self.config = model.config
        self.device, self.batch_size = device, request.batch_size
        self.data = CorpusWindows(tokenizer.encode(corpus, add_special_tokens=False), request.seq_len, request.seed)

    def loss(self, autocast: bool) -> tuple[torch.Tensor, float | None]:
        # Every rank draws the whole global batch (so all keep one data position) and trains on its rows.
        window = self.data.next_batch(self.batch_size)[self.rows].to(self.device)
        inputs, targets = window[:, :-1], window[:, 1:]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = self.forward(input_ids=inputs, use_cache=False).logits
        # Mean over all N = batch × seq_len predicted tokens, in fp32 even under autocast.
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1)), None

    def state(self) -> dict[str, Any]:
        return {"data": self.data.state()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.data.load_state(state["data"])


class BanditTask:
    def __init__(self, request: TrainRequest, device: torch.device) -> None:
        self.env = ContextualBandit(request.seed)
        torch.manual_seed(request.seed)  # policy init; the global stream is later restored from checkpoints too
        self.model: nn.Module = Policy(self.env.dim, self.env.actions).to(device)
        self.objective, self.device, self.batch_size = request.objective, device, request.batch_size

    def loss(self, autocast: bool) -> tuple[torch.Tensor, float | None]:
        batch = self.env.observe(self.batch_size)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
            log_probs, values = self.model(batch.contexts.to(self.device))
        log_probs, values = log_probs.float(), values.float()
        # Sampling uses torch's global generator, whose state every checkpoint carries.
        actions = torch.multinomial(log_probs.detach().exp().cpu(), 1).squeeze(1)
        rewards = self.env.reward(batch, actions)
        actions, rewards_on_device = actions.to(self.device), rewards.to(self.device)
        if self.objective == "rl":
            loss = reinforce_loss(log_probs, values, actions, rewards_on_device)
        else:
            loss = seed_rl_loss(log_probs, actions, rewards_on_device)
        return loss, float(rewards.mean())

    def state(self) -> dict[str, Any]:
        return {"env": self.env.state()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.env.load_state(state["env"])


def _lr_factor(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:  # linear warmup, then cosine decay to 10 % at the last step
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _ssl_memory_estimate(model: nn.Module, request: TrainRequest) -> int:
    """Coarse: fp32 weights + grads + Adam moments (16 B/param) and per-token fp32 activations (~40 hidden-size
    vectors per layer, plus three vocab-size rows for logits, softmax and its gradient)."""
    config: Any = getattr(model, "config")  # noqa: B009  # HF configs are untyped
    params = sum(p.numel() for p in model.parameters())
    tokens = request.batch_size * request.seq_len
    per_token = 40 * int(config.hidden_size) * int(config.num_hidden_layers) + 3 * int(config.vocab_size)
    return 16 * params + 4 * tokens * per_token


def _fingerprint(request: TrainRequest, model: nn.Module) -> dict[str, Any]:
    # The step count may change on resume (extending a run); anything that changes the math of a step may not.
    run = {
        "objective": request.objective,
        "batch_size": request.batch_size,
        "lr": request.lr,
        "warmup_steps": request.warmup_steps,
    }
    if request.objective == "ssl":
        run["seq_len"] = request.seq_len
    return {"run": run, "model": model_fingerprint(model)}


def train(request: TrainRequest, on_progress: ProgressCallback | None = None,
          checkpoint_requested: Callable[[], bool] | None = None) -> TrainResult:
    """Run ``request``. ``checkpoint_requested`` is polled after every step: when it answers True (the agent asked,
    say, before a checkpoint-migration), a checkpoint of that step is written, outside the ``checkpoint_every``
    schedule, and training carries on."""
    device = resolve_device(request.device)
    group = distributed.join(request.collective_timeout_s) if request.distributed else None
    try:
        with isolated_global_rng(), oom_guard(f"{request.objective} training"):
            return _train(request, device, on_progress, checkpoint_requested or (lambda: False), group)
    finally:
        if group is not None:
            distributed.leave()


def _train(request: TrainRequest, device: torch.device, on_progress: ProgressCallback | None,
           checkpoint_requested: Callable[[], bool], group: distributed.Group | None) -> TrainResult:
    random.seed(request.seed)
    np.random.seed(request.seed % 2**32)
    torch.manual_seed(request.seed)
    task: Task = CausalLMTask(request, device) if request.objective == "ssl" else BanditTask(request, device)
    optimizer = torch.optim.AdamW(task.model.parameters(), lr=request.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(request.warmup_steps, request.steps))
    fingerprint = _fingerprint(request, task.model)
    payload = _resume_payload(request, fingerprint, group)
    start_step = _restore(payload, task, optimizer, scheduler) if payload is not None else 0
    if group is not None:
        assert isinstance(task, CausalLMTask)  # the request's validator allows ssl only
        task.rows = distributed.shard_of(request.batch_size, group)
        # After loading: DDP's constructor checks that every rank holds the same weights, which they now do.
        task.forward = torch.nn.parallel.DistributedDataParallel(task.model)
    autocast = device.type == "cuda"
    losses: list[float] = []
    rewards: list[float] = []
    checkpoints: list[str] = []
    started = time.perf_counter()
    for step in range(start_step + 1, request.steps + 1):
        task.model.train()
        loss, reward = task.loss(autocast)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        lr = float(optimizer.param_groups[0]["lr"])  # the rate this step used
        scheduler.step()
        losses.append(distributed.mean_over_ranks(loss, group) if group is not None else loss.item())
        if reward is not None:
            rewards.append(reward)
        written = None
        scheduled = bool(request.checkpoint_every) and (step % request.checkpoint_every == 0 or step == request.steps)
        # A request reaches one VM's launcher, not the job; a distributed run checkpoints on its schedule only.
        requested = checkpoint_requested() if group is None else False
        if request.checkpoint_dir and (scheduled or requested):
            written = str(_save(request, step, task, optimizer, scheduler, fingerprint))
            checkpoints.append(written)
        if on_progress is not None:
            on_progress(TrainProgress(step=step, loss=losses[-1], lr=lr, mean_reward=reward, checkpoint=written,
                                      requested=requested and written is not None, rank=group.rank if group else 0,
                                      world_size=group.world_size if group else 1))
    elapsed = time.perf_counter() - started
    steps_run = request.steps - start_step
    exported = _export(request.export_dir, task) if request.export_dir is not None else None
    return TrainResult(
        objective=request.objective,
        start_step=start_step,
        final_step=max(start_step, request.steps),
        losses=tuple(losses),
        rewards=tuple(rewards),
        steps_per_s=steps_run / elapsed if elapsed > 0 and steps_run > 0 else 0.0,
        samples_per_s=steps_run * request.batch_size / elapsed if elapsed > 0 and steps_run > 0 else 0.0,
        checkpoints=tuple(checkpoints),
        device=str(device),
        autocast_dtype="bfloat16" if autocast else None,
        rank=group.rank if group else 0,
        world_size=group.world_size if group else 1,
        exported=exported,
    )


def _restore(payload: dict[str, Any], task: Task, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler) -> int:
    """Everything a checkpoint holds back in place (weights, optimizer, schedule, data position, RNGs); its step."""
    task.model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    task.load_state(payload["task"])
    restore_rng(payload["rng"])
    return int(payload["step"])


def _export(directory: str, task: Task) -> str:
    """The trained model as an HF-format directory a model server can load."""
    assert isinstance(task, CausalLMTask)
    task.model.eval()
    # save_llm writes beside the target and renames: a server never sees half a model.
    return str(save_llm(directory, task.model.to("cpu"), task.tokenizer))  # type: ignore[arg-type]


def _resume_payload(request: TrainRequest, fingerprint: dict[str, Any],
                    group: distributed.Group | None) -> dict[str, Any] | None:
    """The checkpoint to resume from: the newest in checkpoint_dir, or in a distributed run the newest any rank has."""
    if not (request.checkpoint_dir and request.resume):
        return None
    latest = latest_checkpoint(request.checkpoint_dir)
    if group is None:
        return load_checkpoint(latest, fingerprint) if latest is not None else None
    agreed = distributed.agree_on_checkpoint(latest)
    if agreed is None:
        return None
    step, data = agreed
    return load_checkpoint(checkpoint_path(request.checkpoint_dir, step), fingerprint, data)


def _save(
    request: TrainRequest,
    step: int,
    task: Task,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    fingerprint: dict[str, Any],
) -> Path:
    assert request.checkpoint_dir is not None
    payload = {
        "step": step,
        "fingerprint": fingerprint,
        "model": task.model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "task": task.state(),
        "rng": capture_rng(),
    }
    return save_checkpoint(checkpoint_path(request.checkpoint_dir, step), payload)
