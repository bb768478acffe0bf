"""Checking an OData `$filter` someone typed into a setting, before Business Central sees it.

`BC_CUSTOMER_FILTER` and `BC_ITEM_FILTER` narrow what the app pushes into Bookings. A mistake in
them would otherwise surface as BC's 400 in the middle of a sync, or worse, as a filter that
quietly matches everything; so the text is parsed when the settings are read, against the
subset of OData v4 that BC's API v2.0 supports for these fields (comparisons, `and`/`or`/`not`,
parentheses, `contains`/`startswith`/`endswith`, `tolower`/`toupper`), and every field must be
one of the entity's. The first problem is described in words that name the position."""

from __future__ import annotations

import re

CUSTOMER_FILTER_FIELDS = frozenset({
    "number", "displayName", "type", "addressLine1", "addressLine2", "city", "state", "country", "postalCode",
    "phoneNumber", "email", "website", "salespersonCode", "balanceDue", "creditLimit", "taxLiable", "taxAreaId",
    "taxAreaDisplayName", "taxRegistrationNumber", "currencyId", "currencyCode", "paymentTermsId",
    "shipmentMethodId", "paymentMethodId", "blocked", "lastModifiedDateTime"})
"""The fields of BC API v2.0 `customers` (APIV2Customers.Page.al) a filter may name."""

ITEM_FILTER_FIELDS = frozenset({
    "number", "displayName", "displayName2", "type", "itemCategoryId", "itemCategoryCode", "blocked", "gtin",
    "inventory", "unitPrice", "priceIncludesTax", "unitCost", "taxGroupId", "taxGroupCode", "baseUnitOfMeasureId",
    "baseUnitOfMeasureCode", "generalProductPostingGroupId", "generalProductPostingGroupCode",
    "inventoryPostingGroupId", "inventoryPostingGroupCode", "lastModifiedDateTime"})
"""The fields of BC API v2.0 `items` (APIV2Items.Page.al) a filter may name."""

COMPARISONS = frozenset({"eq", "ne", "gt", "ge", "lt", "le"})
BOOLEAN_FUNCTIONS = frozenset({"contains", "startswith", "endswith"})
STRING_FUNCTIONS = frozenset({"tolower", "toupper"})
MAX_LENGTH = 2000

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<string>'(?:[^']|'')*')
  | (?P<datetime>\d{4}-\d{2}-\d{2}(?:T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2}))?)
  | (?P<guid>[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})
  | (?P<number>-?\d+(?:\.\d+)?)
  | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<open>\()
  | (?P<close>\))
  | (?P<comma>,)
""", re.VERBOSE)


class InvalidFilter(ValueError):
    pass


def _tokens(text: str) -> list[tuple[str, str, int]]:
    found, position = [], 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if not match:
            if text[position] == "'":
                raise InvalidFilter(f"a text value starting at position {position + 1} is not closed with '")
            raise InvalidFilter(f"unexpected {text[position]!r} at position {position + 1}")
        if match.lastgroup != "space":
            found.append((match.lastgroup, match.group(), position + 1))
        position = match.end()
    return found


class _Parser:
    def __init__(self, text: str, fields: frozenset[str]):
        self.tokens = _tokens(text)
        self.index = 0
        self.fields = fields

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def take(self) -> tuple[str, str, int]:
        token = self.peek()
        if token is None:
            raise InvalidFilter("the filter ends too early")
        self.index += 1
        return token

    def expect(self, kind: str, what: str) -> None:
        if self.peek() is None:
            raise InvalidFilter(f"expected {what}, but the filter ends")
        token = self.take()
        if token[0] != kind:
            raise InvalidFilter(f"expected {what} at position {token[2]}, found {token[1]!r}")

    def parse(self) -> None:
        self.expression()
        if self.peek() is not None:
            kind, value, position = self.peek()
            raise InvalidFilter(f"unexpected {value!r} at position {position} (missing 'and'/'or'?)")

    def expression(self) -> None:
        self.condition()
        while (token := self.peek()) and token[0] == "word" and token[1] in ("and", "or"):
            self.take()
            self.condition()

    def condition(self) -> None:
        token = self.peek()
        if token and token[0] == "word" and token[1] == "not":
            self.take()
            self.condition()
            return
        if token and token[0] == "open":
            self.take()
            self.expression()
            self.expect("close", "')'")
            return
        if token and token[0] == "word" and token[1] in BOOLEAN_FUNCTIONS:
            self.function(self.take()[1])
            return
        self.operand()
        operator = self.take()
        if operator[0] != "word" or operator[1] not in COMPARISONS:
            raise InvalidFilter(f"expected a comparison (eq, ne, gt, ge, lt, le) at position {operator[2]}, "
                                f"found {operator[1]!r}")
        self.operand()

    def function(self, name: str) -> None:
        self.expect("open", f"'(' after {name}")
        self.operand()
        if name in BOOLEAN_FUNCTIONS:
            self.expect("comma", f"',' in {name}(field, 'text')")
            self.operand()
        self.expect("close", f"')' closing {name}")

    def operand(self) -> None:
        kind, value, position = self.take()
        if kind in ("string", "datetime", "guid", "number"):
            return
        if kind == "word":
            if value in ("true", "false", "null"):
                return
            if value in STRING_FUNCTIONS:
                self.function(value)
                return
            if value in self.fields:
                return
            raise InvalidFilter(f"'{value}' at position {position} is not a field that can be filtered on")
        raise InvalidFilter(f"expected a field or a value at position {position}, found {value!r}")


def validate_filter(text: str, fields: frozenset[str]) -> str:
    """The filter, stripped, if BC can take it for an entity with these fields; else `InvalidFilter`."""
    text = text.strip()
    if len(text) > MAX_LENGTH:
        raise InvalidFilter(f"the filter is longer than {MAX_LENGTH} characters")
    _Parser(text, fields).parse()
    return text
