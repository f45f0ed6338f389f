"""Run one benchmark at two git revisions in one sitting, and compare their machine-readable last lines.

    .venv/bin/python benchmarks/compare_revisions.py REV_A REV_B [--rounds N] -- bench_create.py [ARGS...]

Each revision is checked out as a detached git worktree in a scratch directory; the benchmark script is run from
each worktree (its own copy of the script, with that worktree first on PYTHONPATH, under this checkout's Python),
A and B alternating for ``--rounds`` rounds so that both see the same machine: whatever else the machine does
between rounds falls on both. Every number of the benchmark's last line (``key=value`` pairs) is reported per
revision as its median over the rounds, with B / A. The last line printed is machine-readable:
``rev_a=… rev_b=… rounds=N KEY_a=… KEY_b=… KEY_ratio=…`` for each numeric key.

Benchmarks that need daemons (bench_create, bench_migrate, …) need them running as for a single run; each
worktree writes its own results file, not this checkout's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def last_numbers(output: str) -> dict[str, float]:
    """The numeric ``key=value`` pairs of the last non-empty line."""
    lines = [line for line in output.splitlines() if line.strip()]
    if not lines:
        return {}
    numbers = {}
    for pair in lines[-1].split():
        key, sep, value = pair.partition("=")
        if not sep:
            continue
        try:
            numbers[key] = float(value)
        except ValueError:
            continue
    return numbers


def resolve(rev: str, repo: Path) -> str:
    done = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"compare_revisions: {rev!r} is not a commit of {repo}")
    return done.stdout.strip()


def run_once(tree: Path, script: str, args: list[str]) -> dict[str, float]:
    path = tree / "benchmarks" / script
    if not path.is_file():
        raise SystemExit(f"compare_revisions: {script} does not exist at {tree.name}")
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(tree), str(tree / "tests")])}
    done = subprocess.run([sys.executable, str(path), *args], cwd=tree, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise SystemExit(f"compare_revisions: {script} failed at {tree.name} (exit {done.returncode}): {tail[0]}")
    numbers = last_numbers(done.stdout)
    if not numbers:
        raise SystemExit(f"compare_revisions: {script}'s last line at {tree.name} has no key=value numbers")
    return numbers


def compare(rev_a: str, rev_b: str, script: str, args: list[str], rounds: int, repo: Path = REPO,
            say: Callable[[str], None] = print) -> str:
    """Run and compare; returns the machine-readable line (also printed through ``say``)."""
    commits = {"a": resolve(rev_a, repo), "b": resolve(rev_b, repo)}
    scratch = Path(tempfile.mkdtemp(prefix="hvcmp-", dir="/var/tmp"))
    trees = {side: scratch / f"{side}-{commit[:12]}" for side, commit in commits.items()}
    results: dict[str, list[dict[str, float]]] = {"a": [], "b": []}
    try:
        for side, commit in commits.items():
            subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", "-q", str(trees[side]), commit],
                           check=True, capture_output=True)
        for n in range(rounds):
            for side in ("a", "b") if n % 2 == 0 else ("b", "a"):  # alternate who goes first
                results[side].append(run_once(trees[side], script, args))
                say(f"round {n + 1}/{rounds} {side} ({commits[side][:12]}): "
                    + " ".join(f"{k}={v:g}" for k, v in results[side][-1].items()))
    finally:
        for tree in trees.values():
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)], capture_output=True)
        subprocess.run(["git", "-C", str(repo), "worktree", "prune"], capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)
    keys = [k for k in results["a"][0] if all(k in r for r in results["a"] + results["b"])]
    fields = [f"rev_a={commits['a'][:12]}", f"rev_b={commits['b'][:12]}", f"rounds={rounds}"]
    for key in keys:
        a = statistics.median(r[key] for r in results["a"])
        b = statistics.median(r[key] for r in results["b"])
        say(f"{key}: {a:g} at A, {b:g} at B" + (f", B/A {b / a:.3f}" if a else ""))
        fields += [f"{key}_a={a:g}", f"{key}_b={b:g}", f"{key}_ratio={b / a:.4f}" if a else f"{key}_ratio=nan"]
    line = " ".join(fields)
    say(line)
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev_a")
    parser.add_argument("rev_b")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each revision, alternating (default 3)")
    parser.add_argument("benchmark", help="the script under benchmarks/, e.g. bench_place.py")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own arguments")
    opts = parser.parse_args(argv)
    if opts.rounds < 1:
        parser.error("--rounds must be at least 1")
    args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args  # a "--" of the benchmark's own is kept
    compare(opts.rev_a, opts.rev_b, opts.benchmark, args, opts.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
