"""BC's ETags and the ``If-Match`` check that guards every PATCH and DELETE.

BC's ETag is a weak tag whose value is base64 of ``'<length>;<row version>;00;'``. A PATCH or
DELETE without ``If-Match`` is refused (400 ``BadRequest_InvalidToken``), a tag BC cannot read
too, and a stale one gets 409 ``Request_EntityChanged``: the app must read, then write with the
tag it read, exactly as against the real service.
"""

from __future__ import annotations

import base64
import binascii
import re

from sandbox.bc.errors import BcError, invalid_token

_ETAG = re.compile(r"^'\d+;\d+;\d+;'$")


def etag(version: int) -> str:
    """BC-shaped weak ETag (base64 of ``'<length>;<row version>;00;'``)."""
    text = f"'{len(str(version))};{version};00;'"
    return 'W/"' + base64.b64encode(text.encode()).decode() + '"'


def etag_matches(header: str, version: int) -> bool:
    """True/False for a well-formed If-Match; BcError 400 for a token BC could not read."""
    current = etag(version)
    for tag in (part.strip() for part in header.split(",")):
        if tag == "*" or tag == current or f'W/{tag}' == current:
            return True
        inner = tag.removeprefix("W/").strip('"')
        try:
            decoded = base64.b64decode(inner, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            decoded = ""
        if not _ETAG.match(decoded):
            raise invalid_token()
    return False


def check_if_match(header: str | None, version: int) -> None:
    """The precondition of a PATCH or DELETE on a record at `version`."""
    header = (header or "").strip()
    if not header:
        raise invalid_token()
    if not etag_matches(header, version):
        raise BcError(409, "Request_EntityChanged", "Another user has already changed the record.")
