"""How Microsoft's services measure text: .NET's `String.Length`, in UTF-16 code units.

Business Central's AL `Text[n]`/`Code[n]` and Exchange (Bookings) keep strings as .NET strings, so
a character outside the Basic Multilingual Plane (most emoji) is a surrogate pair and counts 2."""

from __future__ import annotations


def utf16_length(text: str) -> int:
    """The length .NET's ``String.Length`` gives: UTF-16 code units."""
    return len(text.encode("utf-16-le")) // 2
