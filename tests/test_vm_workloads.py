"""Model workloads inside a real TCG guest built from the `ml` image: the agent runs them as child processes.

Python with torch and transformers takes over two minutes to import under TCG, so this module boots one guest and
runs each workload once. The tiny LLM's weights are seeded, so its greedy output inside the guest must equal the
host's for the same prompt: proof that the guest really ran the model, not just that a process exited 0.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import short_tempdir

from guest.workloads.assets import make_tiny_llm
from guest.workloads.llm import generate
from guest.workloads.schema import LLMRequest
from hvctl.context import Context
from hvctl.devhost import PrivateLibvirtd
from hvctl.ops.create import create
from hvctl.ops.lifecycle import destroy
from hvctl.spec import VMSpec
from images.store import ImageStore

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def env(libvirtd: PrivateLibvirtd, image_dir: Path) -> Iterator[dict[str, object]]:
    ImageStore(image_dir).build("ml")
    state = short_tempdir("hvw-")
    (state / "images").symlink_to(image_dir)
    ctx = Context(state_dir=state, uri=libvirtd.uri)
    create(ctx, VMSpec.parse(name="ml", memory_mib=1536, disk_gib=4, image="ml"), boot_timeout=300)
    yield {"ctx": ctx, "state": state, "uri": libvirtd.uri}
    for vm in ctx.ledger.list_vms():
        destroy(ctx, vm.name)
    ctx.close()
    shutil.rmtree(state, ignore_errors=True)


def hvctl(env: dict[str, object], *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    run_env = os.environ | {"HVCTL_STATE_DIR": str(env["state"]), "HVCTL_CONNECT": str(env["uri"]),
                            "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "hvctl.cli", *args], capture_output=True, text=True, env=run_env,
                          timeout=timeout)


def test_llm_generates_inside_the_guest_exactly_what_the_host_generates(env: dict[str, object],
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


def test_train_checkpoints_in_the_guest_and_the_checkpoint_comes_out(env: dict[str, object]) -> None:
    result = hvctl(env, "run", "ml", "train", "--objective", "ssl", "--steps", "3", "--checkpoint-every", "1",
                   "--json")
    assert result.returncode == 0, result.stderr
    trained = json.loads(result.stdout)["result"]
    assert trained["final_step"] == 3 and len(trained["checkpoints"]) == 3
    fetched = hvctl(env, "checkpoint", "ml", "--json")
    assert fetched.returncode == 0, fetched.stderr
    local = Path(json.loads(fetched.stdout)["checkpoint"])
    assert local.name == "ckpt-00000003.pt" and local.stat().st_size > 10_000
    logs = hvctl(env, "logs", "ml")
    assert logs.returncode == 0 and '"final_step": 3' in logs.stdout.replace('":3', '": 3')


def test_a_workload_error_is_reported_and_the_agent_keeps_serving(env: dict[str, object]) -> None:
    too_long = hvctl(env, "run", "ml", "llm", "--prompt", "word " * 400, "--max-new-tokens", "2")
    assert too_long.returncode == 14 and "failed" in too_long.stderr
    assert hvctl(env, "agent", "ml", "ping").returncode == 0
