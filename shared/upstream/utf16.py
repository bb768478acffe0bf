"""Text lengths as Business Central and Exchange count them: in UTF-16 code units.

AL's `Text[n]` and `Code[n]` are .NET strings, so BC measures them with `String.Length`: a
character outside the Basic Multilingual Plane (most emoji, some CJK ideographs, musical and
mathematical symbols) is a surrogate pair and counts 2. Python's `len()` counts code points, so a
name of 99 letters and one emoji is 100 for Python and 101 for BC, which refuses it
(`Application_StringExceededLength`). Everything the app cuts or checks for BC or Bookings goes
through here."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field


def units(text: str) -> int:
    """The length .NET's `String.Length` gives."""
    return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)


def cut(text: str, limit: int) -> str:
    """At most `limit` UTF-16 units of `text`, never half of a surrogate pair."""
    if len(text) <= limit // 2 or units(text) <= limit:
        return text
    taken, used = [], 0
    for ch in text:
        size = 2 if ord(ch) > 0xFFFF else 1
        if used + size > limit:
            break
        taken.append(ch)
        used += size
    return "".join(taken)


def fits(text: str, limit: int) -> bool:
    return units(text) <= limit


def _max_units(limit: int):
    def check(value: str | None) -> str | None:
        if value is not None and units(value) > limit:
            raise ValueError(f"at most {limit} characters as Business Central counts them (a character outside "
                             f"the Basic Multilingual Plane, such as most emoji, counts 2); this one has "
                             f"{units(value)}")
        return value
    return check


def Utf16Max(limit: int):  # noqa: N802 - reads as a type in annotations
    """An optional text field of at most `limit` UTF-16 units, for pydantic models."""
    return Annotated[str | None, AfterValidator(_max_units(limit)),
                     Field(json_schema_extra={"maxLength": limit},
                           description=f"At most {limit} UTF-16 units, as Business Central counts (an emoji is 2)")]
