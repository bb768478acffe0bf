"""Graph's `dateTimeTimeZone`: reading one (an offset, a Windows or an IANA zone name) and
writing an instant in a given zone.

Graph documents that `timeZone` "can be set to any of the time zones supported by Windows, as
well as" a list of IANA names. Python's `zoneinfo` knows only IANA names, so Windows names are
mapped by CLDR's `windowsZones.xml` (territory `001`) as the maintained `tzlocal` package ships it
(`tzlocal.windows_tz.win_tz`); without that package, by the few zones written out below.
"""

from __future__ import annotations

from datetime import datetime, timezone, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

try:
    from tzlocal.windows_tz import win_tz as WINDOWS_ZONES
except ImportError:  # pragma: no cover - the sandbox then knows the zones its tests use
    WINDOWS_ZONES = {
        "UTC": "Etc/UTC",
        "Pacific Standard Time": "America/Los_Angeles",
        "Mountain Standard Time": "America/Denver",
        "Central Standard Time": "America/Chicago",
        "Eastern Standard Time": "America/New_York",
        "W. Europe Standard Time": "Europe/Berlin",
    }


def zone_of(name: str) -> tzinfo:
    """The zone a `timeZone` value names (Windows or IANA); ValueError if unknown here."""
    if name.upper() in ("UTC", "Z"):
        return timezone.utc
    try:
        return ZoneInfo(WINDOWS_ZONES.get(name, name))
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r}: neither an IANA nor a known Windows name") from None


def parse_instant(text: str) -> datetime:
    """An ISO 8601 date-time with `Z` or an offset (naive means UTC); raises ValueError."""
    if "T" not in text:
        raise ValueError(f"not a date-time: {text!r}")
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def instant_of(value: Any) -> datetime:
    """A `dateTimeTimeZone` dict as an aware datetime (an unknown zone name is read as UTC)."""
    if not isinstance(value, dict) or not isinstance(value.get("dateTime"), str):
        raise ValueError("expected {dateTime, timeZone}")
    moment = datetime.fromisoformat(value["dateTime"])
    if moment.tzinfo is None:
        try:
            zone = zone_of(value.get("timeZone") or "UTC")
        except ValueError:
            zone = timezone.utc
        moment = moment.replace(tzinfo=zone)
    return moment


def in_zone(value: Any, zone_name: str) -> Any:
    """`value` (a `dateTimeTimeZone`) as the same instant in `zone_name`, written as Graph writes a
    local time (`2026-11-20T01:00:00.0000000`, no offset) with that label; unreadable values as
    they are."""
    try:
        local = instant_of(value).astimezone(zone_of(zone_name))
    except ValueError:
        return value
    return {"dateTime": f"{local:%Y-%m-%dT%H:%M:%S}.{local.microsecond:06d}0", "timeZone": zone_name}
