"""OData query options as Business Central evaluates them: `$filter`, `$orderby`, `$select`.

Business Central does not run arbitrary OData: it turns a `$filter` into AL record filters and
reports an error for anything with no AL equivalent. The simulator keeps those limits so that a
query the app sends here also works against the real service:

- every comparison is *property op literal* (a literal on both sides, e.g. the injected
  ``1 eq 1``, has no AL equivalent and is refused);
- ``or`` may only combine conditions on one field (AL filters are per field and ANDed together);
- the literal must have the property's type (``id eq 'x'`` is refused: GUIDs are unquoted);
- text comparisons (``eq``, ``gt``…, ``contains``/``startswith``/``endswith``) are
  case-sensitive, as AL filters are on BC's case-sensitive collation; ``tolower``/``toupper``
  are what make a comparison case-insensitive. By default they apply to the field's value, as
  OData defines them (`FilterRules` switches to BC's documented AL approximation, in which they
  just "disable case sensitivity"). Code fields hold upper-case values and are compared with
  the literal as sent unless `FilterRules.code_literals_upper`;
- a string literal longer than the field is refused as BC refuses it
  (``Application_FilterErrorException``, "The length of the string is 81, but it must be less
  than or equal to 80 characters");
- nested function calls (``contains(tolower(email),'x')``) need ``$schemaversion=2.1``;
- ``in (...)`` is refused: API v2.0 has been seen to ignore it silently and return every record,
  so an app that relies on it would work here and fail in production.

Every malformed expression raises `ODataError` (reported as 400 by the simulator), never anything
else. The grammar (tokens, tree, parser) is `sandbox.bc.odata_syntax`; this module compiles a
parsed filter against an entity, and reads `$select` and `$orderby`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sandbox.bc.odata_syntax import (
    BOOL,
    BOOLEAN_FUNCTIONS,
    CODE,
    DATE,
    DATETIME,
    GUID,
    NUMBER,
    STRING,
    TEXT_FUNCTIONS,
    TEXT_KINDS,
    Call,
    Compare,
    FilterValueError,
    Literal,
    Logical,
    NestedCallError,
    Not,
    ODataError,
    Parser,
    Property,
    parse_datetime,
    parse_filter,
)
from sandbox.text import utf16_length

_EDM = {STRING: "Edm.String", CODE: "Edm.String", GUID: "Edm.Guid", NUMBER: "Edm.Decimal", BOOL: "Edm.Boolean",
        DATE: "Edm.Date", DATETIME: "Edm.DateTimeOffset", "null": "null"}


@dataclass(frozen=True)
class FilterRules:
    """The variants of BC's filter translation the documentation leaves open (the defaults are the
    strictest reading), and the request's ``$schemaversion``."""

    code_literals_upper: bool = False
    """True: a literal compared with a Code field is upper-cased first (as if BC normalised it
    like a value it stores). Default: compared as sent, so ``number eq 'c00010'`` finds nothing."""
    case_functions_ignore_case: bool = False
    """True: ``tolower``/``toupper`` make the comparison case-insensitive whatever the literal's case
    (the docs' "closest AL approximation"). Default: they apply to the field's value (OData), so
    ``tolower(email) eq 'Bob@x.com'`` finds nothing."""
    nested_functions: bool = False
    """Nested calls such as ``contains(tolower(email),'x')``: allowed from ``$schemaversion=2.1``."""
    max_nodes: int | None = 100
    """ASP.NET OData's ``MaxNodeCount`` (`sandbox.bc.nodes`); None: no limit."""
    count_conversions: bool = True
    """Count the conversions OData's binding inserts (`sandbox.bc.nodes`, strictest reading)."""


@dataclass(frozen=True)
class EntityType:
    """What the query layer needs to know about an entity: its name and its properties' types."""

    name: str
    """OData type name, e.g. ``customer`` (messages say ``Microsoft.NAV.customer``)."""
    properties: Mapping[str, str]
    """Property name → one of STRING, CODE, GUID, NUMBER, BOOL, DATE, DATETIME."""
    lengths: Mapping[str, int] = field(default_factory=dict)
    """Maximum length of a text property (``Text[80]`` → 80)."""
    captions: Mapping[str, str] = field(default_factory=dict)
    """The table field's caption, for messages (``email`` → ``Email``)."""
    table: str = ""
    """The table behind the entity, for messages."""

    def type_of(self, name: str) -> str:
        if name not in self.properties:
            raise ODataError(f"Could not find a property named '{name}' on type 'Microsoft.NAV.{self.name}'.")
        return self.properties[name]


Predicate = Callable[[Mapping[str, Any]], bool]


def normalize(kind: str, value: Any) -> Any:
    """A stored value in the form comparisons use (times in UTC, GUIDs lower, text as stored)."""
    if value is None:
        return None
    if kind in TEXT_KINDS:
        return str(value)
    if kind == GUID:
        return str(value).lower()
    if kind == NUMBER:
        return Decimal(str(value))
    if kind == DATETIME:
        return parse_datetime(str(value))
    return value


def _fields_of(node) -> set[str]:
    if isinstance(node, Property):
        return {node.name}
    if isinstance(node, Literal):
        return set()
    if isinstance(node, Call):
        return set().union(*(_fields_of(arg) for arg in node.args))
    if isinstance(node, Not):
        return _fields_of(node.operand)
    if isinstance(node, Logical):
        return set().union(*(_fields_of(operand) for operand in node.operands))
    return _fields_of(node.left) | _fields_of(node.right)


@dataclass(frozen=True)
class _Operand:
    """A property, or ``tolower``/``toupper`` of one, on the left of a comparison."""

    kind: str
    name: str
    case: str | None
    """``lower``/``upper`` for tolower/toupper, None for the property itself."""
    get: Callable[[Mapping[str, Any]], Any]


class _Compiler:
    def __init__(self, entity: EntityType, rules: FilterRules):
        self.entity = entity
        self.rules = rules

    def predicate(self, node) -> Predicate:
        if isinstance(node, Logical):
            if node.op == "or":
                fields = _fields_of(node)
                if len(fields) > 1:
                    names = ", ".join(sorted(fields))
                    raise ODataError(
                        f"The filter cannot be applied: 'or' combines different fields ({names}). "
                        "Business Central can only combine conditions on the same field with 'or'.")
            predicates = [self.predicate(operand) for operand in node.operands]
            if node.op == "or":
                return lambda row: any(predicate(row) for predicate in predicates)
            return lambda row: all(predicate(row) for predicate in predicates)
        if isinstance(node, Not):
            inner = self.predicate(node.operand)
            return lambda row: not inner(row)
        if isinstance(node, Compare):
            return self._compare(node)
        if isinstance(node, Call) and node.name in BOOLEAN_FUNCTIONS:
            return self._text_function(node)
        if isinstance(node, Property) and self.entity.type_of(node.name) == BOOL:
            name = node.name
            return lambda row: bool(row.get(name))
        raise ODataError("The $filter expression must evaluate to a Boolean value.")

    def _operand(self, node, nested: bool = False) -> _Operand | None:
        """A property or a tolower/toupper of one; None for anything else."""
        if isinstance(node, Property):
            kind = self.entity.type_of(node.name)
            name = node.name
            return _Operand(kind, name, None, lambda row: normalize(kind, row.get(name)))
        if isinstance(node, Call) and node.name in TEXT_FUNCTIONS:
            if nested and not self.rules.nested_functions:
                raise NestedCallError(
                    f"Nested function calls such as '{node.name}' inside another function are supported only "
                    "with $schemaversion=2.1 or later.")
            inner = self._operand(node.args[0], nested=True)
            if inner is None or inner.kind not in TEXT_KINDS:
                raise ODataError(f"The function '{node.name}' needs a text property as its argument.")
            if self.rules.case_functions_ignore_case:
                return _Operand(inner.kind, inner.name, "fold", inner.get)
            change = str.lower if node.name == "tolower" else str.upper
            get = inner.get
            return _Operand(inner.kind, inner.name, node.name[2:],
                            lambda row: None if (value := get(row)) is None else change(value))
        return None

    def _text_literal(self, operand: _Operand, literal: str, op: str) -> str:
        """The literal as BC filters with it: checked against the field's length, upper-cased for a
        Code field when `FilterRules.code_literals_upper`, case-folded for a case-insensitive one."""
        limit = self.entity.lengths.get(operand.name)
        if limit is not None and utf16_length(literal) > limit:
            caption = self.entity.captions.get(operand.name, operand.name)
            shown = _AL_FILTER[op].format(literal)
            raise FilterValueError(
                f'The filter "{shown}" is not valid for the {caption} field on the '
                f"{self.entity.table or self.entity.name} table. The length of the string is {utf16_length(literal)}, "
                f"but it must be less than or equal to {limit} characters. Value: {literal}")
        if operand.case == "fold":
            return literal.casefold()
        if operand.case is None and operand.kind == CODE and self.rules.code_literals_upper:
            return literal.upper()
        return literal

    def _compare(self, node: Compare) -> Predicate:
        op, left, right = node.op, node.left, node.right
        if isinstance(left, Literal) and not isinstance(right, Literal):
            op = {"gt": "lt", "lt": "gt", "ge": "le", "le": "ge"}.get(op, op)
            left, right = right, left
        if isinstance(left, Call) and left.name in BOOLEAN_FUNCTIONS:
            if not (isinstance(right, Literal) and right.kind == BOOL and op in ("eq", "ne")):
                raise ODataError(f"The function '{left.name}' can only be compared with true or false.")
            inner = self._text_function(left)
            expected = right.value == (op == "eq")
            return lambda row: inner(row) == expected
        operand = self._operand(left)
        if operand is None or not isinstance(right, Literal):
            raise ODataError(
                "The filter cannot be applied: each comparison must compare a property with a literal "
                "value (Business Central has no equivalent for this expression).")
        literal = right
        expected_kind = STRING if operand.kind in TEXT_KINDS else operand.kind
        if literal.kind not in ("null", expected_kind):
            raise ODataError(
                "A binary operator with incompatible types was detected. Found operand types "
                f"'{_EDM[operand.kind]}' and '{_EDM[literal.kind]}' for operator kind '{_op_name(op)}'.")
        getter = operand.get
        if literal.kind == "null":
            if op == "eq":
                return lambda row: getter(row) is None
            if op == "ne":
                return lambda row: getter(row) is not None
            raise ODataError(f"Cannot compare with null using '{op}'.")
        value = literal.value
        if literal.kind == STRING:
            value = self._text_literal(operand, value, op)
            if operand.case == "fold":
                getter = _folded(getter)
        test = _OPERATORS[op]

        def compare(row: Mapping[str, Any]) -> bool:
            current = getter(row)
            return current is not None and test(current, value)
        return compare

    def _text_function(self, node: Call) -> Predicate:
        target, needle = node.args
        operand = self._operand(target, nested=True)
        if operand is None or operand.kind not in TEXT_KINDS:
            raise ODataError(f"The first argument of '{node.name}' must be a text property.")
        if not (isinstance(needle, Literal) and needle.kind == STRING):
            raise ODataError(f"The second argument of '{node.name}' must be a text literal.")
        text = self._text_literal(operand, needle.value, node.name)
        getter = _folded(operand.get) if operand.case == "fold" else operand.get
        method = {"contains": str.__contains__, "startswith": str.startswith, "endswith": str.endswith}[node.name]
        return lambda row: method(getter(row) or "", text)


def _folded(getter: Callable[[Mapping[str, Any]], Any]) -> Callable[[Mapping[str, Any]], Any]:
    return lambda row: None if (value := getter(row)) is None else value.casefold()


_AL_FILTER = {"eq": "='{}'", "ne": "<>'{}'", "gt": ">'{}'", "ge": ">='{}'", "lt": "<'{}'", "le": "<='{}'",
              "contains": "'*{}*'", "startswith": "'{}*'", "endswith": "'*{}'"}
"""How a condition appears in BC's message, in AL filter syntax (``"='value'"``)."""


def _op_name(op: str) -> str:
    return {"eq": "Equal", "ne": "NotEqual", "gt": "GreaterThan", "ge": "GreaterThanOrEqual",
            "lt": "LessThan", "le": "LessThanOrEqual"}[op]


_OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
}


def compile_tree(tree, entity: EntityType, rules: FilterRules | None = None) -> Predicate:
    """Type-check a parsed `$filter`; the result tells whether a (stored) record matches."""
    try:
        return _Compiler(entity, rules or FilterRules()).predicate(tree)
    except RecursionError as error:
        raise ODataError("The $filter expression is nested too deeply.") from error


def compile_filter(text: str, entity: EntityType, rules: FilterRules | None = None) -> Predicate:
    """Parse and type-check a `$filter`; the result tells whether a (stored) record matches."""
    return compile_tree(parse_filter(text), entity, rules)


def filter_fields(text: str) -> set[str]:
    """The properties a `$filter` refers to (used to check the filters BC insists on)."""
    try:
        return _fields_of(Parser(text).parse())
    except RecursionError as error:
        raise ODataError("The $filter expression is nested too deeply.") from error


def parse_select(text: str, entity: EntityType) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise ODataError("The $select query option is empty.")
    for name in names:
        if name != "*":
            entity.type_of(name)
    return [] if "*" in names else names


def parse_orderby(text: str, entity: EntityType) -> list[tuple[str, bool]]:
    """`name [asc|desc], …` → [(name, descending)]."""
    order = []
    for part in text.split(","):
        words = part.split()
        if not words or len(words) > 2 or (len(words) == 2 and words[1].lower() not in ("asc", "desc")):
            raise ODataError(f"The $orderby expression '{text}' is not valid.")
        entity.type_of(words[0])
        order.append((words[0], len(words) == 2 and words[1].lower() == "desc"))
    return order


def sort_rows(rows: list[Mapping[str, Any]], order: list[tuple[str, bool]], entity: EntityType) -> list:
    """Sort like SQL with BC's case-sensitive dictionary collation (``Latin1_General_100_CS_AS``:
    letters in dictionary order, lower case before upper case of the same letter); stable, last
    key applied first."""
    result = list(rows)
    for name, descending in reversed(order):
        kind = entity.type_of(name)

        def key(row, name=name, kind=kind):
            value = normalize(kind, row.get(name))
            if isinstance(value, str):
                value = (value.casefold(), value.swapcase())
            return (value is not None, value if value is not None else 0)
        result.sort(key=key, reverse=descending)
    return result


def is_guid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except (ValueError, AttributeError, TypeError):
        return False
    return len(text) == 36
