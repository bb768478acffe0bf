"""OData `$filter` text as Business Central takes it: checked, and measured in OData's nodes.

Two jobs, one parser:

- **Settings.** `BC_CUSTOMER_FILTER` and `BC_ITEM_FILTER` narrow what the app pushes into
  Bookings. A mistake in them would otherwise surface as BC's 400 in the middle of every sync, so
  the text is parsed when the settings are read, against what BC's API v2.0 takes: comparisons of
  a field with a value, `and`/`or`/`not`, parentheses, `contains`/`startswith`/`endswith`,
  `tolower`/`toupper`; every field one of the entity's; `or` only between conditions on one field
  (BC turns a filter into AL filters, one per field: "you can't use OR operators to apply filters
  on two different fields"); no function inside another (`contains(tolower(city),'x')` needs
  `$schemaversion=2.1`, which the push does not send); and the whole filter the push sends within
  BC's node limit. The first problem is described with its position.
- **Node limit.** BC's OData layer validates a filter with ASP.NET OData's `FilterQueryValidator`
  and its default `MaxNodeCount` of 100: "The node count limit of '100' has been exceeded."
  `node_count` counts the way that validator does (every node of the bound tree: each binary
  operator, `not`, function call, property access and the range variable `$it` it hangs from,
  constant, and the conversion OData inserts where a field's type has facets the operator's or
  function's signature has not: a `Text[80]` field is `Edm.String` with `MaxLength=80`, the
  signatures take an unbounded `Edm.String`). The app does not know every field's type, so it
  counts an upper bound: a conversion for every field under a comparison or a function and for
  every non-text value compared. For the app's own lookups (text fields, text values) that is the
  exact count. `shared/upstream/bc.py` sizes its lookup chunks with it; see `sandbox/FIDELITY.md`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import quote

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
MAX_NODES = 100
"""ASP.NET OData's default `ODataValidationSettings.MaxNodeCount`, which BC keeps."""
MAX_QUERY_CHARS = 2048
"""Not documented for BC: IIS's default `maxQueryString`, the strictest limit a front end is likely
to keep (sandbox/FIDELITY.md, limits checklist)."""
FILTER_URL_CHARS = MAX_QUERY_CHARS - 148
"""Characters a percent-encoded `$filter` may take in a URL: room for `$schemaversion` and a
`$skiptoken` BC adds to a next link."""
CHANGED_SINCE = "lastModifiedDateTime gt {since}"
"""The clause the push adds to a user's filter: only what BC changed since the last push."""

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


# -- the tree ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Node:
    kind: str
    """`and`, `or`, `not`, `compare`, `call`, `field` or `value`."""
    position: int
    """1-based position of the token that made the node."""
    children: tuple[Node, ...] = ()
    name: str = ""
    """The operator, function or field name; the value's token kind for a value."""


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
    """OData precedence: `not` binds tightest, then the comparisons, then `and`, then `or`; a
    chain of `and`/`or` is a left-deep tree of binary operators, as OData binds it."""

    def __init__(self, text: str, fields: frozenset[str] | None):
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

    def parse(self) -> Node:
        if not self.tokens:
            raise InvalidFilter("the filter is empty")
        node = self.either()
        if self.peek() is not None:
            _, value, position = self.peek()
            raise InvalidFilter(f"unexpected {value!r} at position {position} (missing 'and'/'or'?)")
        return node

    def _keyword(self, word: str) -> int | None:
        token = self.peek()
        if token and token[0] == "word" and token[1] == word:
            self.take()
            return token[2]
        return None

    def either(self) -> Node:
        node = self.both()
        while (position := self._keyword("or")) is not None:
            node = Node("or", position, (node, self.both()))
        return node

    def both(self) -> Node:
        node = self.condition()
        while (position := self._keyword("and")) is not None:
            node = Node("and", position, (node, self.condition()))
        return node

    def condition(self) -> Node:
        token = self.peek()
        if token and token[0] == "word" and token[1] == "not":
            self.take()
            return Node("not", token[2], (self.condition(),))
        if token and token[0] == "open":
            self.take()
            node = self.either()
            self.expect("close", "')'")
            return node
        if token and token[0] == "word" and token[1] in BOOLEAN_FUNCTIONS:
            return self.function(self.take())
        left = self.operand()
        operator = self.take()
        if operator[0] != "word" or operator[1] not in COMPARISONS:
            raise InvalidFilter(f"expected a comparison (eq, ne, gt, ge, lt, le) at position {operator[2]}, "
                                f"found {operator[1]!r}")
        right = self.operand()
        fields = [side for side in (left, right) if side.kind != "value"]
        if len(fields) != 1:
            raise InvalidFilter(f"the comparison at position {operator[2]} must compare a field with a value "
                                "(Business Central has no equivalent for anything else)")
        return Node("compare", operator[2], (left, right), operator[1])

    def function(self, token: tuple[str, str, int]) -> Node:
        name, position = token[1], token[2]
        self.expect("open", f"'(' after {name}")
        arguments = [self.operand()]
        if name in BOOLEAN_FUNCTIONS:
            self.expect("comma", f"',' in {name}(field, 'text')")
            arguments.append(self.operand())
        self.expect("close", f"')' closing {name}")
        return Node("call", position, tuple(arguments), name)

    def operand(self) -> Node:
        kind, value, position = self.take()
        if kind in ("string", "datetime", "guid", "number"):
            return Node("value", position, name=kind)
        if kind == "word":
            if value in ("true", "false", "null"):
                return Node("value", position, name="boolean" if value != "null" else "null")
            if value in STRING_FUNCTIONS:
                return self.function((kind, value, position))
            if self.fields is None or value in self.fields:
                return Node("field", position, name=value)
            raise InvalidFilter(f"'{value}' at position {position} is not a field that can be filtered on")
        raise InvalidFilter(f"expected a field or a value at position {position}, found {value!r}")


def parse(text: str, fields: frozenset[str] | None = None) -> Node:
    """The filter's tree; `fields`, when given, are the only fields it may name."""
    return _Parser(text, fields).parse()


# -- OData's node count ----------------------------------------------------------------------------

def _visit(node: Node, converted: bool = False):
    """The nodes OData's validator visits, in its order (each node, then its children), as the
    positions of the tokens that made them. `converted`: the node is an operand OData wraps in a
    conversion (counted as one more node, visited first)."""
    if converted:
        yield node.position
    yield node.position
    if node.kind == "field":
        yield node.position  # the range variable `$it` the property is read from
        return
    for child in node.children:
        wrap = node.kind in ("compare", "call") and (
            child.kind == "field" or (node.kind == "compare" and child.kind == "value" and child.name != "string"))
        yield from _visit(child, wrap)


def node_count(tree: Node | str) -> int:
    """How many nodes ASP.NET OData's `FilterQueryValidator` counts in the filter (an upper bound
    where the fields' types would decide; see the module's docstring)."""
    node = parse(tree) if isinstance(tree, str) else tree
    return sum(1 for _ in _visit(node))


def _node_position(node: Node, number: int) -> int | None:
    """The position of the `number`-th node OData visits (1-based), None if there are fewer."""
    for index, position in enumerate(_visit(node), start=1):
        if index == number:
            return position
    return None


# -- what BC refuses -------------------------------------------------------------------------------

def _fields_under(node: Node) -> set[str]:
    if node.kind == "field":
        return {node.name}
    return set().union(*(_fields_under(child) for child in node.children)) if node.children else set()


def _check_rules(node: Node) -> None:
    if node.kind == "or":
        fields = _fields_under(node)
        if len(fields) > 1:
            raise InvalidFilter(f"'or' at position {node.position} combines different fields ({', '.join(sorted(fields))}); "
                                "Business Central can only combine conditions on one field with 'or'")
    if node.kind == "call":
        for argument in node.children:
            if argument.kind == "call":
                raise InvalidFilter(f"{argument.name}() at position {argument.position} is inside {node.name}(): "
                                    "Business Central takes a function inside another only with $schemaversion=2.1, "
                                    f"which the push does not use; compare {argument.name}(field) with a value instead")
    for child in node.children:
        _check_rules(child)


def changed_since_filter(user_filter: str | None, since: datetime | None) -> str | None:
    """The filter the push sends: the user's, and only what changed since `since`."""
    clauses = [f"({user_filter})"] if user_filter else []
    if since:
        clauses.append(CHANGED_SINCE.format(since=f"{since.astimezone(timezone.utc):%Y-%m-%dT%H:%M:%SZ}"))
    return " and ".join(clauses) or None


def validate_filter(text: str, fields: frozenset[str]) -> str:
    """The filter, stripped, if BC can take it as the push sends it for an entity with these
    fields; else `InvalidFilter` with the reason and the position."""
    text = text.strip()
    if len(text) > MAX_LENGTH:
        raise InvalidFilter(f"the filter is longer than {MAX_LENGTH} characters")
    tree = parse(text, fields)
    _check_rules(tree)
    mine = node_count(tree)
    sent = node_count(changed_since_filter(text, datetime(2000, 1, 1, tzinfo=timezone.utc)))
    if sent > MAX_NODES:
        extra = sent - mine
        position = _node_position(tree, MAX_NODES - extra + 1)
        raise InvalidFilter(f"the filter has {mine} nodes as OData counts them (each comparison, 'and', 'or', 'not', "
                            f"function, field and value; a field counts 2 or 3) and passes the limit at position "
                            f"{position}: Business Central refuses a filter of more than {MAX_NODES} nodes, and the "
                            f"push adds {extra} of its own, so at most {MAX_NODES - extra} can be yours")
    encoded = len(quote(changed_since_filter(text, datetime(2000, 1, 1, tzinfo=timezone.utc)) or "", safe=""))
    if encoded > FILTER_URL_CHARS:
        raise InvalidFilter(f"the filter takes {encoded} characters in the URL once encoded (with the push's own clause); "
                            f"at most {FILTER_URL_CHARS} fit, as a front end in the way may refuse a query string of "
                            f"more than {MAX_QUERY_CHARS}")
    return text
