"""The grammar of a Business Central `$filter`: tokens, the expression tree, and the parser.

What the tree may hold is BC's subset of OData: comparisons (`eq`, `ne`, `gt`, `ge`, `lt`,
`le`), `and`/`or`/`not`, parentheses, `contains`/`startswith`/`endswith` and
`tolower`/`toupper`, with literals of the Edm kinds BC's API pages use. Whether a parsed filter
is one BC runs (one field per `or`, literal types, lengths, nesting) is decided when it is
compiled against an entity (`sandbox.bc.odata`). Every malformed expression raises `ODataError`."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

STRING, CODE, GUID, NUMBER, BOOL, DATE, DATETIME = "string", "code", "guid", "number", "bool", "date", "datetime"
TEXT_KINDS = (STRING, CODE)
"""Both are ``Edm.String``; a CODE field holds upper-case values (AL ``Code[n]``)."""


class ODataError(Exception):
    """A query option Business Central would refuse with 400 Bad Request."""

    code = "BadRequest"


class NestedCallError(ODataError):
    """A nested function call without ``$schemaversion=2.1``: refused, or (`BcOptions`) answered
    with an undefined result."""


class FilterValueError(ODataError):
    """A literal that AL cannot put into the field's filter (BC's ``NavFilterException``)."""

    code = "Application_FilterErrorException"


_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<string>'(?:[^']|'')*')
  | (?P<guid>[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}(?![\w-]))
  | (?P<datetime>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2}))
  | (?P<date>\d{4}-\d{2}-\d{2}(?![\w:]))
  | (?P<number>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?[mMdDlLfF]?(?![\w.]))
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*(?:/[A-Za-z_][A-Za-z0-9_]*)*)
  | (?P<open>\()
  | (?P<close>\))
  | (?P<comma>,)
    """,
    re.VERBOSE,
)


@dataclass(frozen=True)
class _Token:
    kind: str
    text: str
    position: int


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if not match:
            raise ODataError(f"Syntax error at position {position} in '{text}'.")
        kind = match.lastgroup or ""
        if kind != "ws":
            tokens.append(_Token(kind, match.group(0), position))
        position = match.end()
    return tokens


@dataclass(frozen=True)
class Literal:
    kind: str
    """STRING, GUID, NUMBER, BOOL, DATE, DATETIME or ``null``."""
    value: Any


@dataclass(frozen=True)
class Property:
    name: str


@dataclass(frozen=True)
class Call:
    name: str
    args: tuple


@dataclass(frozen=True)
class Compare:
    op: str
    left: Any
    right: Any


@dataclass(frozen=True)
class Logical:
    """``and``/``or`` over a flat tuple, so that a long chain does not nest deeply."""

    op: str
    operands: tuple


@dataclass(frozen=True)
class Not:
    operand: Any


_COMPARISONS = ("eq", "ne", "gt", "ge", "lt", "le")
BOOLEAN_FUNCTIONS = ("contains", "startswith", "endswith")
TEXT_FUNCTIONS = ("tolower", "toupper")


class Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = _tokenize(text)
        self.index = 0

    def parse(self):
        if not self.tokens:
            raise ODataError("The $filter expression is empty.")
        node = self._or()
        if self.index < len(self.tokens):
            token = self.tokens[self.index]
            raise ODataError(f"Syntax error at position {token.position} in '{self.text}'.")
        return node

    def _peek(self) -> _Token | None:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def _take(self, kind: str | None = None, text: str | None = None) -> _Token:
        token = self._peek()
        if token is None:
            raise ODataError(f"Expression expected at position {len(self.text)} in '{self.text}'.")
        if (kind and token.kind != kind) or (text and token.text.lower() != text):
            raise ODataError(f"Syntax error at position {token.position} in '{self.text}'.")
        self.index += 1
        return token

    def _keyword(self, *words: str) -> str | None:
        token = self._peek()
        if token and token.kind == "name" and token.text.lower() in words:
            self.index += 1
            return token.text.lower()
        return None

    def _or(self):
        operands = [self._and()]
        while self._keyword("or"):
            operands.append(self._and())
        return operands[0] if len(operands) == 1 else Logical("or", tuple(operands))

    def _and(self):
        operands = [self._not()]
        while self._keyword("and"):
            operands.append(self._not())
        return operands[0] if len(operands) == 1 else Logical("and", tuple(operands))

    def _not(self):
        if self._keyword("not"):
            return Not(self._not())
        return self._comparison()

    def _comparison(self):
        left = self._primary()
        op = self._keyword(*_COMPARISONS, "in", "has", "add", "sub", "mul", "div", "mod")
        if op is None:
            return left
        if op == "in":
            raise ODataError("The 'in' operator is not supported by the Business Central API; "
                             "combine 'eq' conditions on the same field with 'or'.")
        if op not in _COMPARISONS:
            raise ODataError(f"The operator '{op}' is not supported.")
        return Compare(op, left, self._primary())

    def _primary(self):
        token = self._take()
        if token.kind == "open":
            node = self._or()
            self._take("close")
            return node
        if token.kind == "string":
            return Literal(STRING, token.text[1:-1].replace("''", "'"))
        if token.kind == "guid":
            return Literal(GUID, token.text.lower())
        if token.kind == "date":
            try:
                return Literal(DATE, dt.date.fromisoformat(token.text).isoformat())
            except ValueError as error:
                raise ODataError(f"Unrecognized 'Edm.Date' literal '{token.text}'.") from error
        if token.kind == "datetime":
            return Literal(DATETIME, parse_datetime(token.text))
        if token.kind == "number":
            try:
                return Literal(NUMBER, Decimal(token.text.rstrip("mMdDlLfF")))
            except InvalidOperation as error:
                raise ODataError(f"Unrecognized number literal '{token.text}'.") from error
        if token.kind == "name":
            word = token.text
            if word.lower() in ("true", "false"):
                return Literal(BOOL, word.lower() == "true")
            if word.lower() == "null":
                return Literal("null", None)
            nxt = self._peek()
            if nxt and nxt.kind == "open":
                return self._call(word)
            if "/" in word:
                raise ODataError(f"Navigation in '$filter' ('{word}') is not supported.")
            return Property(word)
        raise ODataError(f"Syntax error at position {token.position} in '{self.text}'.")

    def _call(self, name: str):
        self._take("open")
        args = []
        if self._peek() and self._peek().kind == "close":
            self._take("close")
        else:
            args.append(self._or())
            while self._peek() and self._peek().kind == "comma":
                self._take("comma")
                args.append(self._or())
            self._take("close")
        lowered = name.lower()
        if lowered not in BOOLEAN_FUNCTIONS + TEXT_FUNCTIONS:
            raise ODataError(f"An unknown function with name '{name}' was found.")
        expected = 2 if lowered in BOOLEAN_FUNCTIONS else 1
        if len(args) != expected:
            raise ODataError(f"The function '{name}' takes {expected} argument(s), not {len(args)}.")
        return Call(lowered, tuple(args))


def parse_datetime(text: str) -> str:
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError as error:
        raise ODataError(f"Unrecognized 'Edm.DateTimeOffset' literal '{text}'.") from error
    return value.astimezone(dt.UTC).isoformat(timespec="microseconds")


def parse_filter(text: str):
    """A `$filter`'s syntax tree."""
    try:
        return Parser(text).parse()
    except RecursionError as error:
        raise ODataError("The $filter expression is nested too deeply.") from error
