"""Looking many records up in Business Central at once, within what BC takes in one `$filter`.

A lookup asks for many values of one field with `or` (BC allows `or` only within one field). BC
validates each filter with ASP.NET OData's `MaxNodeCount` of 100, and `tolower(email) eq 'x'` is 6
nodes as OData counts them (`shared/odata_filter.py`), so a filter holds about 14 such terms, not
the 40 the app used to send. The terms are therefore packed by their counted nodes, up to
`NODE_BUDGET` (the limit less a margin for a reading of OData's count we did not foresee), and by
their length in the URL (`QUERY_BUDGET`); the chunk size follows from the count. Many chunks
travel in one `$batch`, so more chunks do not mean more requests.

Text fields compare case-sensitively in BC, so they are asked through `tolower`; Code fields hold
upper-case values and are asked as such. A value longer than its field (in UTF-16 units, as BC
counts) cannot be stored in BC and is never asked (BC would refuse the whole filter).

BC's E-Mail field may hold several addresses separated by `;` (BaseApp Mail Management). Such a
customer is not found by `tolower(email) eq 'x'`, so customers are asked with
`contains(tolower(email),'x')` (a function inside a function: BC takes it with
`$schemaversion=2.1`), which finds the address alone too; a record matches an address only when
the address is one of its list (so `tim@x.com` never links `victim@x.com`). Should BC refuse that
query, `tolower(email) eq 'x'` and the case-sensitive `contains(email,'x')` with the address in
lower and in upper case are asked instead (an address listed in mixed case is then not found)."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import quote, urlencode

from shared.odata_filter import FILTER_URL_CHARS, MAX_NODES, MAX_QUERY_CHARS, node_count  # noqa: F401
from shared.upstream.utf16 import units

NODE_MARGIN = 10
NODE_BUDGET = MAX_NODES - NODE_MARGIN
"""Nodes one lookup filter may have: BC refuses more than 100; 10 stay free."""
QUERY_BUDGET = FILTER_URL_CHARS
"""Characters the percent-encoded `$filter` of one lookup may take (of BC's plausible 2,048)."""
FIELD_LENGTHS = {"email": 80, "displayName": 100, "externalDocumentNumber": 35}
"""Lengths of the fields the app filters on (Customer "E-Mail" Text[80], Name/Description
Text[100], Sales Header "External Document No." Code[35]), in UTF-16 units."""
SCHEMA_2_1 = {"$schemaversion": "2.1"}


def email_addresses(value: str | None) -> list[str]:
    """The addresses of a BC E-Mail field, trimmed and lower-cased, in order, each once. BC's Mail
    Management takes several addresses separated by `;` (`CheckValidEmailAddresses`)."""
    found: list[str] = []
    for part in (value or "").split(";"):
        address = part.strip().lower()
        if "@" in address and address not in found:
            found.append(address)
    return found


def first_email(value: str | None) -> str | None:
    """The first address of a BC E-Mail field (the one a person is written to), or None."""
    addresses = email_addresses(value)
    return addresses[0] if addresses and len(addresses[0]) <= 254 else None


def odata_string(value: str) -> str:
    """An OData string literal: quotes doubled, so the value can never end the literal."""
    return "'" + value.replace("'", "''") + "'"


@dataclass(frozen=True)
class Term:
    value: str
    text: str
    nodes: int
    chars: int


def term(text: str, value: str) -> Term:
    return Term(value, text, node_count(text), len(quote(text, safe="")))


@dataclass(frozen=True)
class Query:
    """One filter of a lookup, the values it asks for, and what to ask should BC refuse it."""
    filter: str
    values: tuple[str, ...]
    params: dict = field(default_factory=dict)
    fallback: tuple[Query, ...] = ()

    def url(self, entity_set: str) -> str:
        return f"{entity_set}?{query_string({'$filter': self.filter, **self.params})}"


def query_string(params: dict) -> str:
    """A query string with spaces as `%20`, never `+`: OData's URL conventions percent-encode them,
    and BC does not say it reads `+` as a space."""
    return urlencode(params, quote_via=quote)


_OR = len(quote(" or ", safe=""))


def pack(terms: list[Term], params: dict | None = None) -> list[Query]:
    """Terms joined with `or`, as many to a filter as `NODE_BUDGET` and `QUERY_BUDGET` allow
    (each `or` is one node more)."""
    queries: list[Query] = []
    chunk: list[Term] = []
    nodes = chars = 0
    for item in terms:
        if chunk and (nodes + 1 + item.nodes > NODE_BUDGET or chars + _OR + item.chars > QUERY_BUDGET):
            queries.append(_query(chunk, params))
            chunk, nodes, chars = [], 0, 0
        if item.nodes > NODE_BUDGET or item.chars > QUERY_BUDGET:
            raise ValueError(f"a lookup term is larger than one filter may be: {item.text[:100]}")
        nodes += item.nodes + (1 if chunk else 0)
        chars += item.chars + (_OR if chunk else 0)
        chunk.append(item)
    if chunk:
        queries.append(_query(chunk, params))
    return queries


def _query(chunk: list[Term], params: dict | None) -> Query:
    return Query(" or ".join(t.text for t in chunk), tuple(t.value for t in chunk), dict(params or {}))


@dataclass(frozen=True)
class Lookup:
    """How one kind of record is found by one field."""
    entity_set: str
    field: str
    code: bool = False
    address_list: bool = False
    """The field may hold several e-mail addresses separated by `;`."""

    def fold(self, value: str) -> str:
        return value.strip().upper() if self.code else value.strip().lower()

    def askable(self, values: list[str]) -> list[str]:
        """The distinct folded values a record in BC could hold (not blank, not longer than the field)."""
        limit = FIELD_LENGTHS[self.field]
        return sorted({self.fold(v) for v in values if v and v.strip() and units(self.fold(v)) <= limit})

    def queries(self, values: list[str]) -> list[Query]:
        subject = self.field if self.code else f"tolower({self.field})"
        if not self.address_list:
            return pack([term(f"{subject} eq {odata_string(v)}", v) for v in values])
        # `contains` also finds the address alone; should BC refuse the nested call, the exact
        # match (case-insensitive) and a case-sensitive `contains` of the address in lower and in
        # upper case (how addresses are usually typed) are asked instead.
        found = []
        for query in pack([term(f"contains({subject},{odata_string(v)})", v) for v in values], SCHEMA_2_1):
            fallback = pack([term(f"{subject} eq {odata_string(v)}", v) for v in query.values]) + \
                pack([term(f"contains({self.field},{odata_string(case(v))})", v) for v in query.values
                      for case in (str.lower, str.upper)])
            found.append(Query(query.filter, query.values, query.params, tuple(fallback)))
        return found

    def keys_of(self, record: dict) -> list[str]:
        """The values a record answers to."""
        value = record.get(self.field) or ""
        if self.address_list:
            return email_addresses(value)
        return [self.fold(value)]
