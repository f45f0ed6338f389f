from __future__ import annotations

import pytest

from hvctl.ops import Undo


def test_undo_runs_newest_first_on_failure_only() -> None:
    log: list[str] = []
    with pytest.raises(ValueError), Undo() as undo:
        undo.push("a", lambda: log.append("a"))
        undo.push("b", lambda: log.append("b"))
        raise ValueError("step c failed")
    assert log == ["b", "a"]

    log.clear()
    with Undo() as undo:
        undo.push("a", lambda: log.append("a"))
        undo.commit()
    assert log == []


def test_a_failing_undo_does_not_hide_the_original_error() -> None:
    ran: list[str] = []

    def broken() -> None:
        raise OSError("disk gone")

    with pytest.raises(ValueError, match="original") as exc, Undo() as undo:
        undo.push("first", lambda: ran.append("first"))
        undo.push("broken", broken)
        raise ValueError("original")
    assert ran == ["first"]
    assert any("broken" in note and "disk gone" in note for note in exc.value.__notes__)
