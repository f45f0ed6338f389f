"""benchmarks/compare_revisions.py against a throwaway git repository whose "benchmark" prints a different number at
each of two commits: the tool runs each revision from its own worktree and leaves no worktree behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import compare_revisions  # noqa: E402 - the benchmarks directory is not a package

BENCH = """import sys
from pathlib import Path
runs = Path(sys.argv[1])
runs.write_text(runs.read_text() + "{side}" if runs.exists() else "{side}")
print("warming up")
print("x_s={x} n=3 device=cpu")
"""


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    git(repo, "init", "-q")
    for side, x in (("a", "1.5"), ("b", "3.0")):
        (repo / "benchmarks" / "bench_fake.py").write_text(BENCH.format(side=side, x=x))
        git(repo, "add", "-A")
        git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", side)
        git(repo, "tag", side)
    return repo


def test_each_revision_runs_its_own_script_alternating_and_the_ratio_is_b_over_a(repo: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    said: list[str] = []
    line = compare_revisions.compare("a", "b", "bench_fake.py", [str(runs)], 3, repo=repo, say=said.append)
    assert line == (f"rev_a={git(repo, 'rev-parse', 'a')[:12]} rev_b={git(repo, 'rev-parse', 'b')[:12]} rounds=3 "
                    "x_s_a=1.5 x_s_b=3 x_s_ratio=2.0000 n_a=3 n_b=3 n_ratio=1.0000")
    assert runs.read_text() == "abbaab"  # alternating who goes first
    assert said[-1] == line
    assert git(repo, "worktree", "list").count("\n") == 0  # only the repository's own


def test_a_failing_benchmark_or_an_unknown_revision_is_one_line_and_leaves_no_worktree(repo: Path) -> None:
    with pytest.raises(SystemExit, match="'nope' is not a commit"):
        compare_revisions.compare("a", "nope", "bench_fake.py", ["/x"], 1, repo=repo, say=lambda _: None)
    with pytest.raises(SystemExit, match=r"bench_fake.py failed at a-\w+ \(exit 1\): .*(Error|error)"):
        compare_revisions.compare("a", "b", "bench_fake.py", ["/nonexistent/dir/runs"], 1, repo=repo,
                                  say=lambda _: None)
    with pytest.raises(SystemExit, match="bench_other.py does not exist"):
        compare_revisions.compare("a", "b", "bench_other.py", [], 1, repo=repo, say=lambda _: None)
    assert git(repo, "worktree", "list").count("\n") == 0


def test_the_last_line_numbers_are_read_and_words_skipped() -> None:
    assert compare_revisions.last_numbers("x\nratio=1.5 device=cpu n=2\n\n") == {"ratio": 1.5, "n": 2.0}
    assert compare_revisions.last_numbers("") == {}
