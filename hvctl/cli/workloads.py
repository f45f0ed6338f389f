"""hvctl run, logs, checkpoint, restore."""

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from guest.kinds import HVCTL_RUN
from hvctl.cli.common import (
    JsonOpt,
    MaxBytesOpt,
    app,
    ctx,
    emit_json,
    err,
    fail,
    out,
    plain,
    safe,
)
from hvctl.limits import DEFAULT_MAX_DOWNLOAD_BYTES

if TYPE_CHECKING:
    from hvctl.context import Context
    from hvctl.ledger import VMRecord

# -- workloads ------------------------------------------------------------------------------------------------


@app.command()
def run(
    name: Annotated[str, typer.Argument(help="The VM (with --vms: the workload, train).")],
    kind: Annotated[str | None, typer.Argument(help=", ".join(HVCTL_RUN))] = None,
    prompt: Annotated[list[str] | None, typer.Option(help="llm: a prompt (repeat for a batch).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="llm: tokens to generate.")] = 16,
    stream: Annotated[bool, typer.Option(help="llm: print tokens as they are generated.")] = False,
    temperature: Annotated[float | None, typer.Option(help="llm: sample at this temperature.")] = None,
    top_p: Annotated[float | None, typer.Option(help="llm: nucleus sampling.")] = None,
    seed: Annotated[int | None, typer.Option(help="llm: sampling seed.")] = None,
    backend: Annotated[str, typer.Option(help="llm: eager (HF generate), fast (our decode loop; CUDA graphs on a "
                                              "GPU) or onnx (ONNX Runtime).")] = "eager",
    weights: Annotated[str, typer.Option(help="llm: native, or int8 (weight-only, --backend fast).")] = "native",
    text: Annotated[str | None, typer.Option(help="perception: caption.")] = None,
    image: Annotated[Path | None, typer.Option(help="perception: PNG or .npy image.")] = None,
    audio: Annotated[Path | None, typer.Option(help="perception: WAV or .npy audio.")] = None,
    model: Annotated[str | None, typer.Option(help="llm, train (ssl): a model directory in the guest, or the name "
                                                   "of one in the image (default: tiny-llm).")] = None,
    export: Annotated[str | None, typer.Option(help="train (ssl): write the trained model to this directory in "
                                                    "the guest, ready for `hvctl serve NAME reload --model DIR`.")]
    = None,
    objective: Annotated[str, typer.Option(help="train: ssl, rl or seed-rl.")] = "ssl",
    steps: Annotated[int, typer.Option(help="train: steps to run (resumes from the latest checkpoint).")] = 10,
    checkpoint_every: Annotated[int, typer.Option(help="train: checkpoint every K steps.")] = 5,
    batch_size: Annotated[int, typer.Option(help="train: the global batch (split over the VMs with --distributed).")]
    = 8,
    vms: Annotated[str | None, typer.Option("--vms", help="train --distributed: the VMs, a,b[,c]; the first hosts "
                                                          "the rendezvous.")] = None,
    distributed: Annotated[bool, typer.Option(help="train (ssl): data-parallel over --vms, on their tenant "
                                                   "network.")] = False,
    min_nodes: Annotated[int | None, typer.Option(help="--distributed: go on without a lost VM while this many "
                                                       "are left (default: all of them).")] = None,
    collective_timeout: Annotated[float, typer.Option(
        min=1.0, help="--distributed: seconds a rank waits for a lost peer before the rest re-form and resume.")]
    = 120.0,
    timeout: Annotated[float | None, typer.Option(help="Cancel the workload after this many seconds.")] = None,
    detach: Annotated[bool, typer.Option(help="Start it and return; follow it with `hvctl logs`.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run a model workload inside a VM through its agent, following its output."""
    from hvctl.ops import run as ops

    if vms is not None or distributed:
        if vms is None or not distributed or kind is not None or name != "train":
            fail("a distributed job is `hvctl run --vms a,b[,c] train --distributed`", 2)
        run_distributed([v for v in vms.split(",") if v], steps, checkpoint_every, model, batch_size, min_nodes,
                        collective_timeout, timeout, detach, as_json)
        return
    if kind is None:
        fail(f"which workload? `hvctl run NAME {'|'.join(HVCTL_RUN)}`", 2)
    c = ctx()
    record = c.ledger.vms.get(name)
    if kind == "llm":
        args = ops.llm_args(prompt or [], max_new_tokens, stream, temperature, top_p, seed, model, backend, weights)
    elif kind == "perception":
        args = ops.perception_args(c, record, text, image, audio)
    elif kind == "train":
        args = ops.train_args(objective, steps, checkpoint_every, model, export) + ["--batch-size", str(batch_size)]
    else:
        fail(f"unknown workload {kind!r}; use {', '.join(HVCTL_RUN)}", 2)

    if detach:
        status = ops.start_workload(c, record, kind, args)
        if as_json:
            emit_json(status.model_dump(mode="json"))
        else:
            out.print(f"{kind} started in {name} as {status.id}; `hvctl logs {name}` shows its output")
        return

    _follow(c, record, kind, args, stream=stream and kind == "llm" and not as_json, steps=steps, timeout=timeout,
            as_json=as_json)


def _follow(c: "Context", record: "VMRecord", kind: str, args: list[str], stream: bool, steps: int,
            timeout: float | None, as_json: bool) -> None:
    """Run the workload and follow it: its tokens as they come (``stream``) or a status line with its last output
    or training step; then its result, or its failure as the exit status."""
    from guest.workloads.protocol import parse_progress
    from hvctl.ops import run as ops

    name = record.name
    started = time.monotonic()
    status_line = err.status(f"{kind} in {name}: starting")
    status_line.start()

    def on_output(chunk: str) -> None:
        if stream:
            status_line.stop()
            sys.stdout.write(plain("".join(ops.stream_text(chunk))))
            sys.stdout.flush()
        else:
            last = [line for line in chunk.splitlines() if line.strip() and not line.startswith("{")]
            last += [f"step {p.step}/{steps} loss {p.loss:.4f}" for p in parse_progress(chunk)]
            if last:
                status_line.update(f"{kind} in {name} ({time.monotonic() - started:.0f} s): {safe(last[-1][:100])}")
            else:
                status_line.update(f"{kind} in {name}: running ({time.monotonic() - started:.0f} s)")

    try:
        result = ops.run_workload(c, record, kind, args, on_output, timeout=timeout)
    finally:
        status_line.stop()
    if stream:
        sys.stdout.write("\n")
    if as_json:
        emit_json(result.model_dump(mode="json"))
    elif result.state == "succeeded":
        out.print(describe_result(kind, result.result or {}, time.monotonic() - started), markup=False)
    if result.state != "succeeded":
        fail(f"workload {result.id} in {name} {result.state}: {result.error}", ops.WorkloadFailed.exit_code)


def run_distributed(vms: list[str], steps: int, checkpoint_every: int, model: str | None, batch_size: int,
                    min_nodes: int | None, collective_timeout: float, timeout: float | None, detach: bool,
                    as_json: bool) -> None:
    """`hvctl run --vms a,b train --distributed`: per-rank progress on one status line, the result at the end."""
    from hvctl.ops import distributed
    from hvctl.ops import run as ops

    c = ctx()
    train = ops.train_args("ssl", steps, checkpoint_every, model) + ["--collective-timeout", str(collective_timeout)]
    started = time.monotonic()
    at: dict[str, int] = {}
    status_line = err.status(f"train on {','.join(vms)}: starting the launchers")
    status_line.start()

    def on_event(event: distributed.Event) -> None:
        elapsed = f"{time.monotonic() - started:.0f} s"
        if event.kind == "ready":
            status_line.update(f"train on {','.join(vms)} ({elapsed}): {event.vm} ready")
        elif event.kind == "go":
            status_line.update(f"train on {','.join(vms)} ({elapsed}): rendezvous at {event.vm}")
        elif event.kind == "dropped":
            err.print(f"{event.vm} left the job: {safe(event.reason or '')}", markup=False)
        elif event.kind == "moving":
            err.print(f"{event.vm} is being moved by a checkpoint migration: the job goes on without it until it "
                      "rejoins", markup=False)
        elif event.kind == "rejoined":
            err.print(f"{event.vm} rejoined the job ({event.workload})", markup=False)
        elif event.progress is not None:
            at[event.vm] = event.progress.step
            ranks = ", ".join(f"{vm} {step}" for vm, step in at.items())
            status_line.update(f"train on {len(at)} VMs ({elapsed}): step {max(at.values())}/{steps} "
                               f"loss {event.progress.loss:.4f} (world {event.progress.world_size}; {ranks})")

    try:
        result = distributed.run_job(c, vms, train, batch_size, min_nodes, on_event, timeout, detach)
    finally:
        status_line.stop()
    if as_json:
        emit_json(result.as_dict())
        return
    if result.state == "started":
        out.print(f"job {result.job} started on {', '.join(result.workloads)} over network {result.network} "
                  f"(rendezvous at {result.rendezvous}); `hvctl logs VM` follows each rank "
                  f"({', '.join(f'{v} {w}' for v, w in result.workloads.items())}). Detached: hvctl does not "
                  "cancel the rest if a VM is lost; the launchers re-form on their own", markup=False)
        return
    out.print(describe_result("train", result.result, time.monotonic() - started), markup=False)
    out.print(f"job {result.job} on {', '.join(result.finished)} over network {result.network}"
              + "".join(f"; {vm} dropped: {why}" for vm, why in result.dropped.items())
              + f". Per-rank progress: `hvctl logs VM` ({', '.join(f'{v} {w}' for v, w in result.workloads.items())})",
              markup=False)


def describe_result(kind: str, r: dict[str, Any], wall: float) -> str:
    if kind == "llm":
        texts = "\n".join(f"  [{i}] {c['text']!r}" for i, c in enumerate(r.get("completions", [])))
        backend = f"{r.get('backend')}/{r.get('provider')}" if r.get("provider") else r.get("backend")
        return (f"{texts}\n{backend} on {r.get('device')} {r.get('dtype', '')}: "
                f"ttft {r.get('ttft_s', 0) * 1000:.0f} ms, "
                f"decode {r.get('decode_tokens_per_s', 0):.1f} tok/s, prompt {r.get('prompt_tokens_per_s', 0):.1f} "
                f"tok/s (wall {wall:.1f} s, including Python start-up in the guest)")
    if kind == "perception":
        probs = ", ".join(f"{k} {v:.2f}" for k, v in (r.get("probabilities") or {}).items())
        return f"label {r.get('label')} ({probs}) in {wall:.1f} s"
    losses = r.get("losses") or []
    return (f"{r.get('objective')}: steps {r.get('start_step', 0) + 1}..{r.get('final_step')}, "
            f"loss {losses[0] if losses else float('nan'):.4f} -> {losses[-1] if losses else float('nan'):.4f}, "
            f"{r.get('steps_per_s', 0):.2f} steps/s, {len(r.get('checkpoints') or [])} checkpoint(s)"
            + (f"; model exported to {r['exported']}" if r.get("exported") else ""))


@app.command()
def logs(
    name: str,
    workload: Annotated[str | None, typer.Option("--id", help="Workload id (default: the latest).")] = None,
) -> None:
    """Print the output of a VM's workload."""
    from guest import rpc
    from hvctl.ops.run import agent_for, latest_workload

    c = ctx()
    client = agent_for(c, c.ledger.vms.get(name))
    workload = workload or latest_workload(client, name)
    offset = 0
    while True:
        chunk = client.typed("workload.logs", rpc.WorkloadLogs, rpc.WorkloadLogsParams(id=workload, offset=offset))
        sys.stdout.write(plain(chunk.data))
        offset = chunk.next_offset
        if chunk.eof or not chunk.data:
            break


@app.command(name="workloads")
def list_workloads(name: str, as_json: JsonOpt = False) -> None:
    """The workloads a VM's agent started since it booted: id, kind, state and how it ended."""
    from hvctl.ops.run import agent_for, workloads

    c = ctx()
    known = workloads(agent_for(c, c.ledger.vms.get(name)))
    if as_json:
        emit_json([w.model_dump(exclude={"result"}) | {"vm": name} for w in known])
        return
    if not known:
        out.print(f"{name} has run no workload since it booted")
    for w in known:
        ended = f"exit {w.exit_code}" if w.exit_code is not None else ""
        out.print(f"{w.id}  {w.kind:<16} {w.state:<10} {ended}  {w.error or ''}".rstrip(), markup=False)


@app.command(name="cancel")
def cancel_workloads(
    names: Annotated[str, typer.Argument(help="A VM, or several separated by commas (a distributed job's).")],
    workload: Annotated[str | None, typer.Option("--id", help="Only this workload (default: every running one).")]
    = None,
    as_json: JsonOpt = False,
) -> None:
    """Stop a VM's running workloads (the whole process group of each); a distributed job's VMs all at once."""
    from hvctl.ops.run import agent_for, cancel

    c = ctx()
    vms = [n for n in names.split(",") if n]
    cancelled = cancel({vm: agent_for(c, c.ledger.vms.get(vm)) for vm in vms}, workload)
    if as_json:
        emit_json([{"vm": vm, "id": s.id, "kind": s.kind, "state": s.state} for vm, s in cancelled])
        return
    if not cancelled:
        out.print(f"nothing was running on {', '.join(vms)}")
    for vm, s in cancelled:
        out.print(f"{vm}: {s.id} ({s.kind}) {s.state}")


@app.command()
def checkpoint(
    name: str,
    objective: Annotated[str, typer.Option(help="Which training run: ssl, rl or seed-rl.")] = "ssl",
    out_dir: Annotated[Path | None, typer.Option("--out", help="Where to put it (default: STATE/checkpoints/NAME).")]
    = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a file of the same name in --out.")] = False,
    max_bytes: MaxBytesOpt = DEFAULT_MAX_DOWNLOAD_BYTES,
    as_json: JsonOpt = False,
) -> None:
    """Copy a VM's latest training checkpoint (written at a step boundary) to the host, as a 0600 file."""
    from hvctl.ops.run import fetch_checkpoint

    c = ctx()
    local = fetch_checkpoint(c, c.ledger.vms.get(name), objective, out_dir or c.paths.root / "checkpoints" / name,
                             force=force, max_bytes=max_bytes)
    if as_json:
        emit_json({"vm": name, "objective": objective, "checkpoint": str(local), "bytes": local.stat().st_size})
    else:
        out.print(f"checkpoint of {name} ({objective}) saved to {local}")


@app.command()
def restore(
    name: str,
    ckpt: Path,
    objective: Annotated[str, typer.Option(help="Which training run: ssl, rl or seed-rl.")] = "ssl",
) -> None:
    """Put a checkpoint into a VM; its next `hvctl run NAME train` resumes from it."""
    from hvctl.ops.run import push_checkpoint

    c = ctx()
    remote = push_checkpoint(c, c.ledger.vms.get(name), objective, ckpt)
    out.print(f"{ckpt.name} restored into {name} at {remote}; the next train run resumes from it")
