"""A Bookings customer in the form Business Central accepts.

BC validates what it stores: `country` is a code of its Country/Region table (Graph's
`countryOrRegion` is free text: "United States", "Norge", "Pays-Bas"), a phone number must not
contain letters, an e-mail address needs one `@` and a domain with a dot, and text longer than
its field is refused. One refused field would make BC refuse the whole customer, and then none of
that customer's bookings could be invoiced. So each field is brought into BC's form where that is
certain (a country name in any of several languages → BC's code for it) and left blank where it
cannot be; what was left out is kept with the customer's link and shown, never silently dropped.
If BC still refuses a field, `drop_refused` names it from BC's message so the create is repeated
without it."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache

from shared.flows.messages import CustomerSource
from shared.upstream.utf16 import cut, units

LENGTHS = {"displayName": 100, "email": 80, "phoneNumber": 30, "addressLine1": 100, "city": 30, "state": 30,
           "postalCode": 20, "country": 10}
"""The BC Customer fields' lengths (Name Text[100], E-Mail Text[80], Phone No. Text[30], Address
Text[100], City Text[30], County Text[30], Post Code Code[20], Country/Region Code Code[10]), in
UTF-16 units as BC counts them (`shared/upstream/utf16.py`)."""

COUNTRY_NAME_LANGUAGES = ("en", "nb", "nn", "da", "sv", "fi", "is", "de", "nl", "fr", "es", "it", "pt", "pl",
                          "cs", "ru")
"""Languages whose CLDR territory names (through Babel) are understood as a country: English, the
languages of BC's own Bookings pages (Norwegian, Dutch, German, Russian, French) and their
neighbours."""

ALIASES = {"usa": "US", "us": "US", "u s": "US", "u s a": "US", "united states of america": "US", "america": "US",
           "uk": "GB", "u k": "GB", "great britain": "GB", "britain": "GB", "england": "GB", "scotland": "GB",
           "wales": "GB", "northern ireland": "GB", "holland": "NL", "the netherlands": "NL"}
"""Everyday names CLDR does not list."""

CAPTIONS = {"country/region code": "country", "phone no.": "phoneNumber", "e-mail": "email",
            "email address": "email", "post code": "postalCode", "county": "state", "city": "city",
            "address 2": "addressLine2", "address": "addressLine1"}
"""BC's field captions, as its messages name them, to the API's field names."""

_EMAIL = re.compile(r"^[^@\s;,]+@[^@\s;,]+\.[^@\s;,.]{2,}$")


def _key(text: str) -> str:
    """A name folded for comparison: case, accents' composition, punctuation and spacing."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = re.sub(r"[.\-_,()']", " ", text)
    return " ".join(text.split())


@lru_cache(maxsize=1)
def _iso_by_name() -> dict[str, str]:
    """ISO 3166 code by (folded) territory name in every language of COUNTRY_NAME_LANGUAGES."""
    from babel import Locale  # only the directory worker needs it: keep it out of app start-up

    names: dict[str, str] = {}
    for language in COUNTRY_NAME_LANGUAGES:
        for code, name in Locale.parse(language).territories.items():
            if len(code) == 2 and code.isalpha():
                names.setdefault(_key(name), code)
    return names


@lru_cache(maxsize=1)
def _names_by_iso() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for name, code in _iso_by_name().items():
        found.setdefault(code, set()).add(name)
    return found


class Countries:
    """BC's Country/Region table (`countriesRegions`), and the way from free text to its codes."""

    def __init__(self, rows: list[dict]):
        self.codes = {str(r["code"]).upper(): str(r["code"]) for r in rows if r.get("code")}
        self.by_name = {_key(str(r["displayName"])): str(r["code"]) for r in rows if r.get("code") and r.get("displayName")}

    def code_for(self, text: str) -> str | None:
        """BC's code for a country written as a code or a name (in one of several languages),
        or None if BC has no such country/region."""
        key = _key(text)
        if not key:
            return None
        if text.strip().upper() in self.codes:
            return self.codes[text.strip().upper()]
        if key in self.by_name:
            return self.by_name[key]
        iso = ALIASES.get(key) or _iso_by_name().get(key)
        if iso is None:
            return None
        if iso in self.codes:
            return self.codes[iso]
        # A company whose codes are not ISO (e.g. "NOR"): its own name for the country.
        return next((self.by_name[name] for name in _names_by_iso().get(iso, ()) if name in self.by_name), None)


@dataclass
class Mapped:
    """BC customer fields for a Bookings customer, and what had to be left out (API field → why)."""
    fields: dict[str, str]
    left_out: dict[str, str] = field(default_factory=dict)

    def drop(self, name: str, reason: str) -> None:
        self.fields.pop(name, None)
        self.left_out[name] = reason

    def summary(self) -> str:
        return "; ".join(f"{name}: {reason}" for name, reason in sorted(self.left_out.items()))


def accepted_email(value: str) -> bool:
    """BC's check (MailManagement): one `@`, and a domain with a dot before a top-level domain of
    two or more characters; no spaces."""
    return units(value) <= LENGTHS["email"] and bool(_EMAIL.match(value))


def map_customer(source: CustomerSource, countries: Countries | None) -> Mapped:
    """The BC fields for `source`, each in BC's form or left out with the reason."""
    name = cut((source.display_name or source.email).strip(), LENGTHS["displayName"]).strip()
    wanted = {"displayName": name, "email": source.email, "phoneNumber": source.phone,
              "addressLine1": source.address_line1, "city": source.city, "state": source.state,
              "postalCode": source.postal_code}
    mapped = Mapped({key: value.strip() for key, value in wanted.items() if value and value.strip()})
    for key, value in list(mapped.fields.items()):
        if units(value) > LENGTHS[key]:
            mapped.drop(key, f"'{value}' is longer than the {LENGTHS[key]} characters Business Central allows "
                             "(it counts a character such as an emoji as 2)")
    email = mapped.fields.get("email")
    if email and not accepted_email(email):
        mapped.drop("email", f"'{email}' is not an e-mail address Business Central accepts")
    phone = mapped.fields.get("phoneNumber")
    if phone and any(ch.isalpha() for ch in phone):
        mapped.drop("phoneNumber", f"'{phone}' contains letters, which Business Central does not accept in a phone "
                                   "number")
    if source.country and source.country.strip():
        code = countries.code_for(source.country) if countries else None
        if code:
            mapped.fields["country"] = code
        else:
            mapped.left_out["country"] = (f"'{source.country.strip()}' is not a country/region in Business Central "
                                          "(add it on the Countries/Regions page, or correct the address in Bookings)")
    return mapped


def drop_refused(mapped: Mapped, message: str) -> bool:
    """After BC refused a customer: leave out the field its message names (by caption, or by the
    value it quotes). False when the message names none of the fields still mapped."""
    lowered = message.lower()
    for caption, name in CAPTIONS.items():
        if caption in lowered and name in mapped.fields and name != "displayName":
            mapped.drop(name, f"Business Central refused it: {message}")
            return True
    for name, value in list(mapped.fields.items()):
        if name != "displayName" and value and value.lower() in lowered:
            mapped.drop(name, f"Business Central refused it: {message}")
            return True
    return False


def minimal(mapped: Mapped, message: str) -> bool:
    """Leave out every optional field (the last resort when BC's refusal names none); False if
    nothing was left to drop."""
    optional = [name for name in mapped.fields if name != "displayName"]
    for name in optional:
        mapped.drop(name, f"left out after Business Central refused the customer: {message}")
    return bool(optional)
