"""What was wrong with something pydantic refused, said one way everywhere: each bad field with its dotted path,
the value it had (when that is a scalar) and the rule it broke. Used on both sides of the agent channel (the
controller, the agent, the workload CLI, the image recipes), so it lives in the guest package, which both have."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError


@dataclass(frozen=True)
class Problem:
    field: str  # the dotted path, or "value" for the whole input
    loc: tuple[str, ...]
    value: str | None  # repr of the bad value when it is a scalar
    rule: str

    def __str__(self) -> str:
        return f"{self.field} {self.value}: {self.rule}" if self.value is not None else f"{self.field}: {self.rule}"


def problems(exc: ValidationError) -> list[Problem]:
    """Each error, in pydantic's order."""
    found = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        rule = err["msg"]
        if err["type"] == "string_pattern_mismatch":
            rule = f"must match {err.get('ctx', {}).get('pattern', '').strip('^$')}"
        value = err.get("input")
        found.append(Problem(".".join(loc) or "value", loc,
                             repr(value) if isinstance(value, str | int | float) else None, rule))
    return found


def describe(exc: ValidationError) -> str:
    """Every problem, on one line."""
    return "; ".join(str(p) for p in problems(exc))
