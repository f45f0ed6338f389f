"""The resident model server under load, on the host: 32 concurrent streaming clients against hvctl's server
(``python -m guest.serving``, the process the agent runs in a VM), against the same requests one at a time through
plain HF ``generate``, and against the best alternative that installs here, ``transformers serve
--continuous-batching`` (the same library's own OpenAI-compatible server), in one run.

The model is a random-weight Llama of bench_llm.py's `small` shape (CPU, fp32) saved with a byte-level BPE
tokenizer; prompts are text of different lengths (a ragged batch); greedy decoding, stopping at EOS or after
``--new-tokens``. Throughput counts the tokens each path really generated. Time to first token and inter-token
latency come from the server-sent events each client receives. The server's answers are checked against the
sequential ones, text for text.

The alternative needs transformers' serving extras (fastapi, uvicorn, openai): give a directory holding them with
``--alt-path`` (``pip install --target DIR fastapi uvicorn openai starlette``); without them it is reported as not
run. Usage: benchmarks/bench_serve.py [-n CLIENTS] [--new-tokens T] [--threads K] [--alt-path DIR] [--out FILE].
The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import transformers  # noqa: E402
from bench_llm import model_config  # noqa: E402
from common import Report  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig  # noqa: E402

from guest.serving.server import ADMIN_SOCKET, admin_call  # noqa: E402
from guest.workloads.assets import (  # noqa: E402
    TINY_CHAT_TEMPLATE,
    build_random_llama,
    read_corpus,
    save_llm,
    train_tokenizer,
)

_TEXT = ("the river runs past the mill and the town sleeps while the lamps burn low along the quiet road "
         "where carts once rolled")
WORDS = _TEXT.split()


def prompts_for(n: int) -> list[str]:
    """``n`` deterministic prompts of 6 to 60 words."""
    return [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(6 + (i * 13) % 55)) for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_model(directory: Path) -> Path:
    config = model_config("small", context=256)
    tokenizer = train_tokenizer(read_corpus(None), config.vocab_size)
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    config.vocab_size = max(config.vocab_size, len(tokenizer))
    return save_llm(directory, build_random_llama(config, seed=0), tokenizer)


def stream_one(port: int, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """One streamed completion: its text, and when each piece of it arrived."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    started = time.perf_counter()
    conn.request("POST", "/v1/completions", body=json.dumps({"model": model, "prompt": prompt,
                                                              "max_tokens": max_tokens, "stream": True,
                                                              "temperature": 0.0}),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    text, arrivals = "", []
    for raw in response:
        line = raw.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if "error" in event:
            raise RuntimeError(str(event["error"]))
        piece = event["choices"][0].get("text") or ""
        if piece:
            arrivals.append(time.perf_counter() - started)
            text += piece
    conn.close()
    return {"text": text, "arrivals": arrivals, "ended": time.perf_counter() - started}


def load_test(port: int, model: str, prompts: list[str], max_tokens: int) -> dict[str, Any]:
    stream_one(port, model, prompts[0], 4)  # warm-up, untimed
    results: list[dict[str, Any] | None] = [None] * len(prompts)
    errors: list[str] = []

    def client(i: int) -> None:
        try:
            results[i] = stream_one(port, model, prompts[i], max_tokens)
        except Exception as exc:  # noqa: BLE001 - counted and reported
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    done = [r for r in results if r is not None]
    ttft = sorted(r["arrivals"][0] for r in done if r["arrivals"])
    gaps = sorted(b - a for r in done for a, b in zip(r["arrivals"], r["arrivals"][1:], strict=False))
    return {"wall": wall, "texts": [r["text"] if r else None for r in results], "errors": errors, "ttft": ttft,
            "itl": gaps}


def summarize(say: Any, label: str, run: dict[str, Any], generated: int, seq_tok_s: float,
              sequential_texts: list[str]) -> float:
    """One path's line of the report; returns its tokens/s (0 when any request failed)."""
    tok_s = generated / run["wall"] if not run["errors"] else 0.0
    equal = sum(a == b for a, b in zip(run["texts"], sequential_texts, strict=True))
    first_error = f" (first error: {run['errors'][0][:200]})" if run["errors"] else ""
    say(f"{label}: {run['wall']:.2f} s, {tok_s:.0f} tok/s, speedup {tok_s / seq_tok_s:.2f}x; TTFT p50 "
        f"{quantile(run['ttft'], 0.5) * 1000:.0f} ms p99 {quantile(run['ttft'], 0.99) * 1000:.0f} ms; inter-token "
        f"p50 {quantile(run['itl'], 0.5) * 1000:.0f} ms p99 {quantile(run['itl'], 0.99) * 1000:.0f} ms; "
        f"{len(run['errors'])} failed{first_error}; answers equal to the sequential ones: {equal} of "
        f"{len(sequential_texts)}")
    return tok_s


def quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def wait_until(ready: Any, proc: subprocess.Popen[bytes], what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}) before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout:.0f} s")
        time.sleep(0.25)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=32, help="concurrent clients")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, every path")
    parser.add_argument("--alt-path", type=Path, default=Path("/var/tmp/hvctl-serve-alt"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_serve.txt")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-serve-", dir="/var/tmp"))
    procs: list[subprocess.Popen[bytes]] = []
    report = Report()
    say = report.say
    try:
        model_dir = make_model(work / "small")
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        prompts = prompts_for(args.n)
        lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
        params_m = sum(p.numel() for p in model.parameters()) / 1e6
        say(f"# bench_serve {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()}: torch {torch.__version__}, "
            f"transformers {transformers.__version__}, CPU, {args.threads} thread(s) per path; small random Llama "
            f"({params_m:.1f} M params, fp32); {args.n} clients at once, prompts {min(lengths)}-{max(lengths)} "
            f"tokens, up to {args.new_tokens} new tokens (greedy, stop at EOS)")
        env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}

        # 1. One at a time through plain HF generate.
        greedy = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
        sequential_texts, generated = [], 0
        with torch.inference_mode():
            model.generate(**tokenizer(prompts[0], return_tensors="pt"), generation_config=greedy)  # warm-up
            started = time.perf_counter()
            for prompt in prompts:
                ids = tokenizer(prompt, return_tensors="pt")
                new = model.generate(**ids, generation_config=greedy)[0, ids["input_ids"].shape[1]:]
                generated += len(new)
                sequential_texts.append(tokenizer.decode(new, skip_special_tokens=True))
            sequential_s = time.perf_counter() - started
        seq_tok_s = generated / sequential_s
        say(f"one at a time (HF generate): {sequential_s:.2f} s, {generated} tokens, {seq_tok_s:.0f} tok/s")

        # 2. hvctl's server, as the agent starts it.
        port = free_port()
        state = work / "serve"
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "guest.serving", "serve", "--state-dir", str(state), "--port", str(port),
             "--model", f"small={model_dir}", "--max-seqs", str(args.n), "--max-tokens", "256"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

        def served() -> bool:
            try:
                code, data = admin_call(state / ADMIN_SOCKET, "GET", "/status")
            except OSError:
                return False
            return code == 200 and [m["state"] for m in data["models"]] == ["ready"]

        wait_until(served, procs[-1], "hvctl's server")
        ours = load_test(port, "small", prompts, args.new_tokens)
        serve_tok_s = summarize(say, f"hvctl serve ({args.n} concurrent streaming clients)", ours, generated,
                                seq_tok_s, sequential_texts)
        procs[-1].terminate()
        procs[-1].wait(60)

        # 3. transformers serve --continuous-batching, the alternative.
        alt_tok_s = 0.0
        alt_env = env | {"PYTHONPATH": f"{args.alt_path}:{ROOT}"}
        probe = subprocess.run([sys.executable, "-c", "import fastapi, uvicorn, openai"], env=alt_env,
                               capture_output=True, text=True)
        if probe.returncode != 0:
            say(f"transformers serve: not run (its serving extras are not importable from {args.alt_path}: "
                f"{probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else probe.returncode})")
        else:
            alt_port = free_port()
            pages = args.n * -(-256 // 16) + 16
            log = (work / "alt.log").open("wb")
            transformers_cli = shutil.which("transformers", path=str(Path(sys.executable).parent)) or "transformers"
            procs.append(subprocess.Popen(
                [transformers_cli, "serve", str(model_dir), "--continuous-batching", "--cb-block-size", "16",
                 "--cb-num-blocks", str(pages), "--max-model-len", "256", "--device", "cpu", "--port",
                 str(alt_port), "--host", "127.0.0.1"], env=alt_env, stdout=log, stderr=subprocess.STDOUT))

            def alt_up() -> bool:
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", alt_port, timeout=5)
                    conn.request("GET", "/health")
                    ok = conn.getresponse().status == 200
                    conn.close()
                    return ok
                except OSError:
                    return False

            wait_until(alt_up, procs[-1], "transformers serve")
            theirs = load_test(alt_port, str(model_dir), prompts, args.new_tokens)
            alt_tok_s = summarize(say, "transformers serve --continuous-batching", theirs, generated, seq_tok_s,
                                  sequential_texts)
        say(f"serve_tok_s={serve_tok_s:.0f} sequential_tok_s={seq_tok_s:.0f} "
            f"speedup={serve_tok_s / seq_tok_s:.2f} alt_tok_s={alt_tok_s:.0f} "
            f"ttft_p99_ms={quantile(ours['ttft'], 0.99) * 1000:.0f}")
        report.save(args.out)
        return 0 if not ours["errors"] else 1
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
