"""Model workloads inside a real TCG guest built from the `ml` image: the agent runs them as child processes.

Python with torch and transformers takes over two minutes to import under TCG, so this module boots one guest and
runs each workload once. The tiny LLM's weights are seeded, so its greedy output inside the guest must equal the
host's for the same prompt: proof that the guest really ran the model, not just that a process exited 0.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import Controller, Daemons, short_tempdir
from framework.devhost import PrivateLibvirtd
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from guest.workloads.assets import make_tiny_llm
from guest.workloads.llm import generate
from guest.workloads.schema import LLMRequest
from hvctl.host import DomainState
from hvctl.ops.create import create
from hvctl.ops.hosts import add_host
from hvctl.ops.incarnation import BootOptions
from hvctl.spec import VMSpec
from images.store import ImageStore

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def env(libvirtd: PrivateLibvirtd, image_dir: Path) -> Iterator[Controller]:
    ImageStore(image_dir).build("ml")
    controller = Controller.open(short_tempdir("hvw-"), libvirtd.uri, image_dir, cli_timeout=900)
    with Daemons(controller.state / "daemons") as daemons:
        try:
            # A second "host" for the checkpoint-migration tests: a private daemon of its own. cgroups off: both
            # daemons run a domain named "ml" for a while, and on one machine their cgroup names would collide.
            add_host(controller.ctx, "h2", daemons.start("h2", cgroups=False).uri)
            create(controller.ctx, VMSpec.parse(name="ml", memory_mib=1536, disk_gib=4, image="ml", host="local"),
                   options=BootOptions(timeout=300))
            yield controller
        finally:
            controller.close(remove_state=False)  # its VMs first; the daemons, then the state dir, after
    shutil.rmtree(controller.state, ignore_errors=True)


def hvctl(env: Controller, *args: str, timeout: float = 900, crash_after: str | None = None,
          fail_after: str | None = None) -> subprocess.CompletedProcess[str]:
    return env.hvctl(*args, timeout=timeout, crash_after=crash_after, fail_after=fail_after)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def greedy(model: object, ids: list[int], new: int) -> list[int]:
    config = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=2, pad_token_id=0)
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), generation_config=config)  # type: ignore[attr-defined]
    return [int(t) for t in out[0, len(ids):]]


def repair_after_crash(env: Controller, step: str, *args: str) -> str:
    """hvctl killed with SIGKILL right after ``step`` (no timing involved), then `doctor --repair`; returns what the
    repair did, which must be a decision."""
    killed = hvctl(env, *args, crash_after=step, timeout=1100)
    assert killed.returncode == -9, f"{step}: not killed ({killed.returncode}): {killed.stderr}"
    repaired = hvctl(env, "doctor", "--repair", "--json")
    (done,) = json.loads(repaired.stdout)["repaired"]["operations"]
    assert not done["outcome"].startswith("undecided"), done
    return str(done["outcome"])


def checkpoints_left_here() -> list[Path]:
    """What a checkpoint migration copies to this machine (hvctl's temporary directories for VM ml)."""
    return list(Path(tempfile.gettempdir()).glob("hvctl-ckpt-ml-*"))


def latest_step(env: Controller) -> int:
    return max(int(p["step"]) for p in progress(env))  # type: ignore[call-overload]


def keeps_training(env: Controller) -> None:
    """A later step shows up. How soon depends on the machine (a TCG guest on a loaded host took over 10 s for one
    step), so wait for it, with a bound only a stopped workload reaches."""
    before = latest_step(env)
    deadline = time.monotonic() + 300
    while latest_step(env) <= before:
        assert time.monotonic() < deadline, "the source stopped training"
        time.sleep(5)


def test_llm_generates_inside_the_guest_exactly_what_the_host_generates(env: Controller,
                                                                       tmp_path: Path) -> None:
    result = hvctl(env, "run", "ml", "llm", "--prompt", "The river", "--max-new-tokens", "4", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["state"] == "succeeded" and status["result"]["device"] == "cpu"
    inside = status["result"]["completions"][0]["token_ids"]
    torch.set_num_threads(1)
    model_dir = make_tiny_llm(tmp_path / "tiny")
    here = generate(LLMRequest(model_dir=str(model_dir), prompts=("The river",), max_new_tokens=4)).completions
    assert inside == list(here[0].token_ids)
    assert status["result"]["decode_tokens_per_s"] > 0


def test_a_workload_error_is_reported_and_the_agent_keeps_serving(env: Controller) -> None:
    # A request the workload refuses before importing torch (the host tests cover each refusal, such as a prompt
    # longer than the context window); here the point is the path back: exit code, reason, and an agent still up.
    bad = hvctl(env, "run", "ml", "train", "--steps", "0")
    assert bad.returncode == 14 and "failed" in bad.stderr and "steps" in bad.stderr, bad.stderr
    assert hvctl(env, "agent", "ml", "ping").returncode == 0


def sse_text(port: int, body: dict[str, object]) -> tuple[str, int]:
    """A streamed chat completion over plain HTTP: the text its server-sent events carry, and how many came."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body | {"stream": True}),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream", response.read()
    payloads = [line.removeprefix(b"data: ").strip() for line in response.read().split(b"\n\n") if line.strip()]
    conn.close()
    assert payloads[-1] == b"[DONE]", payloads[-3:]
    chunks = [json.loads(p) for p in payloads[:-1]]
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks), len(chunks)


def test_the_model_server_serves_a_tenant_swaps_in_fine_tuned_weights_and_survives_live_migration(
        env: Controller, tmp_path: Path) -> None:
    """`serve start` in the guest; a streamed chat completion from outside the VM through the tenant's `ssh -L`
    line (real OpenSSH, the VM's pinned host key); `generate` through the agent channel; a fine-tune in the same VM
    exported and swapped in with `serve reload` (the answer changes to the tuned weights' greedy answer, computed
    here from the copied-out weights); a live migration to h2 and back with the server still the same process and
    answering; `serve stop`. Each answer is checked against the host's own greedy tokens."""
    ctx = env.ctx
    local_port = free_port()
    started = hvctl(env, "serve", "ml", "start", "--model", "tiny-llm", "--max-seqs", "4", "--max-tokens", "128",
                    "--local-port", str(local_port), "--json", timeout=1500)
    assert started.returncode == 0, started.stderr
    status = json.loads(started.stdout)
    assert status["state"] == "running" and [m["state"] for m in status["models"]] == ["ready"], status
    assert status["ssh_forward"][-4:-1] == ["-N", "-L", f"{local_port}:127.0.0.1:{status['port']}"]

    torch.set_num_threads(1)
    host_dir = make_tiny_llm(tmp_path / "tiny")  # the image's tiny-llm, built the same way
    host_model = AutoModelForCausalLM.from_pretrained(host_dir)
    tokenizer = AutoTokenizer.from_pretrained(host_dir)
    messages = [{"role": "user", "content": "The river"}]
    chat_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    chat_ids = list(chat_ids["input_ids"] if hasattr(chat_ids, "keys") else chat_ids)
    expected_chat = tokenizer.decode(greedy(host_model, chat_ids, 6), skip_special_tokens=True)

    forward = subprocess.Popen(status["ssh_forward"], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120  # a hang guard: ssh connects through the VM's forward first
        while True:
            assert forward.poll() is None, forward.stderr.read() if forward.stderr else b""
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", local_port), timeout=5):
                break
            assert time.monotonic() < deadline, "the tenant's ssh -L never listened"
            time.sleep(0.5)
        text, events = sse_text(local_port, {"model": "tiny-llm", "messages": messages, "max_tokens": 6})
        assert text == expected_chat and events >= 2, (text, expected_chat)
    finally:
        forward.terminate()
        forward.wait(10)

    prompt_ids = tokenizer("The river")["input_ids"]
    before = json.loads(hvctl(env, "generate", "ml", "--prompt", "The river", "--max-tokens", "6", "--json").stdout)
    assert before["token_ids"] == greedy(host_model, prompt_ids, 6)

    tuned = "/var/lib/hvctl-agent/tuned"
    trained = hvctl(env, "run", "ml", "train", "--objective", "ssl", "--steps", "8", "--checkpoint-every", "8",
                    "--export", tuned, "--json", timeout=1500)
    assert trained.returncode == 0, trained.stderr
    assert json.loads(trained.stdout)["result"]["exported"] == tuned
    reloaded = hvctl(env, "serve", "ml", "reload", "--model", tuned, "--json")
    assert reloaded.returncode == 0, reloaded.stderr
    (entry,) = json.loads(reloaded.stdout)["models"]
    assert entry["name"] == "tiny-llm" and entry["version"] == 2 and entry["dir"] == tuned
    after = json.loads(hvctl(env, "generate", "ml", "--prompt", "The river", "--max-tokens", "6", "--json").stdout)
    copied = tmp_path / "tuned"
    shutil.copytree(host_dir, copied)
    for name in ("model.safetensors", "config.json"):
        (copied / name).unlink()
        got = hvctl(env, "cp", f"ml:{tuned}/{name}", str(copied / name))
        assert got.returncode == 0, got.stderr
    tuned_model = AutoModelForCausalLM.from_pretrained(copied)
    assert after["token_ids"] == greedy(tuned_model, prompt_ids, 6) != before["token_ids"]
    print(f"\nserve reload: {before['text']!r} -> {after['text']!r}")

    pid = json.loads(hvctl(env, "serve", "ml", "status", "--json").stdout)["pid"]
    for there in ("h2", "local"):
        moved = hvctl(env, "migrate", "ml", "--to", there, "--json")
        assert moved.returncode == 0, moved.stderr
        asked = hvctl(env, "serve", "ml", "status", "--json")
        assert asked.returncode == 0, (there, asked.stderr)
        now = json.loads(asked.stdout)
        assert now["state"] == "running" and now["pid"] == pid, now
        answered = hvctl(env, "generate", "ml", "--prompt", "The river", "--max-tokens", "6", "--json")
        assert answered.returncode == 0, (there, answered.stderr)
        again = json.loads(answered.stdout)
        assert again["token_ids"] == after["token_ids"]
    assert ctx.ledger.vms.get("ml").host == "local"

    stopped = hvctl(env, "serve", "ml", "stop", "--json")
    assert stopped.returncode == 0 and json.loads(stopped.stdout)["state"] == "stopped", stopped.stderr
    gone = hvctl(env, "generate", "ml", "--prompt", "The river")
    assert gone.returncode == 2 and "runs no model server" in gone.stderr, gone.stderr


def progress(env: Controller) -> list[dict[str, object]]:
    """The latest workload's per-step progress lines, read through `hvctl logs`."""
    result = hvctl(env, "logs", "ml")
    assert result.returncode == 0, result.stderr
    return [json.loads(line)["progress"] for line in result.stdout.splitlines() if line.startswith('{"progress"')]


@pytest.fixture(scope="module")
def training(env: Controller) -> str:
    """One training run of the tests below, started detached (checkpointing every 2 steps, and far from done when
    they end), once its first checkpoint is reported. Each test that needs it asks for it, so any of them runs
    alone too; run together, in this file's order, they share it, and it moves with the VM. Returns its id."""
    started = hvctl(env, "run", "ml", "train", "--objective", "ssl", "--steps", "100000", "--checkpoint-every", "2",
                    "--detach", "--json")
    assert started.returncode == 0, started.stderr
    status = json.loads(started.stdout)
    assert status["state"] == "running"
    deadline = time.monotonic() + 600  # a hang guard: importing torch under TCG takes minutes
    while not any(p["checkpoint"] for p in progress(env)):
        assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
        time.sleep(5)
    return str(status["id"])


@pytest.mark.usefixtures("training")
def test_detached_training_checkpoints_and_the_checkpoint_comes_out(env: Controller) -> None:
    fetched = hvctl(env, "checkpoint", "ml", "--json")
    assert fetched.returncode == 0, fetched.stderr
    local = Path(json.loads(fetched.stdout)["checkpoint"])
    assert local.name.startswith("ckpt-") and local.stat().st_size > 10_000


@pytest.mark.usefixtures("training")
def test_a_checkpoint_migration_that_fails_leaves_the_source_training(env: Controller) -> None:
    """The migration fails at its last step before the commit, after the checkpoint, the copy, the target's boot and
    the restored workload's verified first step, so every undo runs. The failure is injected at that step (a
    timeout would race the machine's speed: a fast one finishes inside it). The source never stops training."""
    ctx = env.ctx
    result = hvctl(env, "migrate", "ml", "--to", "h2", "--mode", "checkpoint",
                   fail_after="migrate-checkpoint.verified")
    assert result.returncode == 15 and "still on local" in result.stderr, result.stderr
    assert "fault injected after step verified" in result.stderr, result.stderr
    assert ctx.ledger.vms.get("ml").host == "local" and ctx.ledger.reservations.all() == []
    assert ctx.host("h2").state("ml") is DomainState.MISSING
    assert not ctx.paths.vm_dir("ml", 1).exists()
    assert ctx.ledger.events.recent("ml")[-1].kind == "migration.failed"
    keeps_training(env)


@pytest.mark.usefixtures("training")
def test_a_checkpoint_migration_killed_before_its_commit_is_rolled_back_and_the_source_trains_on(
        env: Controller) -> None:
    """hvctl killed right after each step before the commit, then `doctor --repair`: the new incarnation on h2 (its
    domain, files and GPUs), the reservation and the checkpoints copied here are gone, the lock is free, and the
    source, which never stopped, is still training. Prints its rows of the crash matrix.

    Not killed after "verified": its repair is booted's (the new incarnation found by the UUID recorded at
    "defined", destroyed with whatever runs in it), and reaching it costs a second torch import under TCG, about
    2.5 minutes; the failing migration above goes through "verified" and is undone from there."""
    ctx = env.ctx
    matrix = []
    for step in ("checked", "reserved", "checkpointed", "files", "defined", "started", "booted"):
        outcome = repair_after_crash(env, f"migrate-checkpoint.{step}", "migrate", "ml", "--to", "h2", "--mode",
                                     "checkpoint")
        assert ctx.ledger.vms.get("ml").host == "local", (step, outcome)
        assert ctx.ledger.reservations.all() == [] and ctx.ledger.operations.all() == [], step
        assert ctx.host("h2").state("ml") is DomainState.MISSING, step
        assert not ctx.paths.vm_dir("ml", 1).exists() and checkpoints_left_here() == [], step
        assert ctx.host("local").state("ml") is DomainState.RUNNING, step
        matrix.append(f"| checkpoint migrate | {step} | {outcome} | on local, training |")
    keeps_training(env)
    print("\n" + "\n".join(matrix))


@pytest.mark.usefixtures("training")
def test_checkpoint_migration_resumes_training_on_the_target_at_the_next_step(env: Controller) -> None:
    """The migration goes all the way, and hvctl is killed right after the ledger committed the move (the last row
    of the crash matrix): `doctor --repair` removes the source incarnation, as the command would have next (the
    same function, by the source domain's UUID), and the VM trains on on the target."""
    ctx = env.ctx
    old = ctx.ledger.vms.get("ml")
    outcome = repair_after_crash(env, "migrate-checkpoint.committed", "migrate", "ml", "--to", "h2", "--mode",
                                 "checkpoint")
    assert outcome.startswith("it had been committed on h2"), outcome
    assert ctx.ledger.operations.all() == [] and checkpoints_left_here() == []
    print(f"\n| checkpoint migrate | committed | {outcome} | on h2, training |")
    stats = ctx.ledger.events.last_data("ml", "migration.completed")
    assert stats is not None
    (moved,) = stats["workloads"]
    # hvctl verified the restore itself: the target's first step is k+1, with the loss the source (which kept
    # training, so it is the uninterrupted run) computed for step k+1. Check its numbers against the guest's logs.
    assert moved["resumed_step"] == moved["checkpoint_step"] + 1 and moved["loss"] == moved["source_loss"]
    record = ctx.ledger.vms.get("ml")
    assert record.host == "h2" and ctx.ledger.reservations.all() == []
    assert record.overlay.parent == ctx.paths.vm_dir("ml", 1) and not old.overlay.parent.exists()
    assert ctx.host("local").state("ml") is DomainState.MISSING
    assert ctx.host("h2").state("ml") is DomainState.RUNNING
    assert record.domain_uuid == ctx.host("h2").guest("ml").uuid != old.domain_uuid  # moved in the commit
    on_target = progress(env)
    assert on_target[0]["step"] == moved["resumed_step"] and on_target[0]["loss"] == moved["loss"]
    shown = json.loads(hvctl(env, "show", "ml", "--json").stdout)
    assert shown["host"] == "h2" and shown["last_migration"]["mode"] == "checkpoint"
    print(f"checkpoint-migration: {stats['total_s']} s, {stats['bytes']} bytes of checkpoint, resumed at step "
          f"{moved['resumed_step']} with loss {moved['loss']}")


@pytest.mark.usefixtures("training")
def test_cancel_stops_the_detached_training_and_workloads_shows_it(env: Controller) -> None:
    """The detached training (after the migration test, the run restarted on h2) is the one running: `hvctl cancel`
    stops it, and the guest's own list of workloads shows it cancelled."""
    listed = hvctl(env, "workloads", "ml", "--json")
    assert listed.returncode == 0, listed.stderr
    running = [w for w in json.loads(listed.stdout) if w["state"] == "running"]
    assert [w["kind"] for w in running] == ["train"], listed.stdout
    cancelled = hvctl(env, "cancel", "ml", "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout) == [{"vm": "ml", "id": running[0]["id"], "kind": "train",
                                             "state": "cancelled"}]
    after = {w["id"]: w["state"] for w in json.loads(hvctl(env, "workloads", "ml", "--json").stdout)}
    assert after[running[0]["id"]] == "cancelled" and "running" not in after.values()
    unknown = hvctl(env, "cancel", "ml", "--id", "w999")
    assert unknown.returncode == 3 and unknown.stderr.strip().splitlines()[-1].startswith("hvctl: error: ml has no "
                                                                                          "workload w999")
