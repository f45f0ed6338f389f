"""Operations: one module per verb. Each is a sequence of steps, and every step that changes the world registers
its undo before the next one runs, so a failure anywhere unwinds exactly what was done and nothing else."""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

Say = Callable[[str], None]
"""How an operation tells its caller what it is doing, one line per step. The CLI's RichReporter is one (it shows
each line with a spinner on stderr); tests may record the lines; a caller that wants none passes ``quiet``."""


def quiet(_: str) -> None:
    """Says nothing."""


class Undo:
    """Collects undo actions; on an exception inside the ``with`` block, runs them newest first, then re-raises.

    An undo that itself fails must not hide the original error, so its failure is recorded on the exception as a
    note rather than raised.
    """

    def __init__(self) -> None:
        self._actions: list[tuple[str, Callable[[], object]]] = []

    def push(self, description: str, action: Callable[[], object]) -> None:
        self._actions.append((description, action))

    def commit(self) -> None:
        self._actions.clear()

    def __enter__(self) -> Undo:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None:
            return
        for description, action in reversed(self._actions):
            try:
                action()
            except Exception as undo_exc:  # noqa: BLE001 - see the class docstring
                exc.add_note(f"cleanup step {description!r} also failed: {undo_exc}")
        self._actions.clear()
