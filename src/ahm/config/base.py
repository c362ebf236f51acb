"""What every config section shares: strict models, the constrained number types, and the one-line wording of a
refused value (the CLI prints it as `SOURCE: section.option must be ...`)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Count = Annotated[int, Field(ge=1)]  # 1 and more
OptionalCount = Count | None  # None, or 1 and more
StepCount = Annotated[int, Field(ge=0)]  # 0 and more
Fraction = Annotated[float, Field(gt=0.0, le=1.0)]  # in (0, 1]
Share = Annotated[float, Field(ge=0.0, le=1.0)]  # in [0, 1]
OpenShare = Annotated[float, Field(ge=0.0, lt=1.0)]  # in [0, 1)
# A lower bound alone lets inf through; these numbers feed optimisers and losses, where inf is never meant.
NonNegative = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]

# pydantic's error types of a value out of its declared range, as the end of "<option> must be ..."
_BOUNDS = {"greater_than_equal": ("ge", "at least"), "greater_than": ("gt", "more than"),
           "less_than_equal": ("le", "at most"), "less_than": ("lt", "less than")}


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def constraint_phrase(err: dict[str, Any]) -> str | None:
    """"must be at least 1 (got 0)" for a declared constraint's error; None for any other error."""
    kind, ctx = err.get("type"), err.get("ctx") or {}
    got = err.get("input")
    shown = f" (got {_number(got)})" if isinstance(got, (int, float, str)) and not isinstance(got, bool) else ""
    if kind in _BOUNDS:
        key, words = _BOUNDS[kind]
        return f"must be {words} {_number(ctx.get(key))}{shown}"
    if kind == "finite_number":
        return f"must be a finite number{shown}"
    if kind == "literal_error":
        return f"must be {ctx.get('expected')}{shown}"
    return None
