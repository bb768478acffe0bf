"""OData answers: one record, or a list after ``$filter``, ``$orderby``, ``$skip``/``$top``,
``$select``, ``$expand`` and server-driven paging.

A list longer than the page size ends with ``@odata.nextLink`` carrying an opaque ``$skiptoken``
(BC's maximum page size is 20,000), so a client that does not follow next links loses records
here as it would in production.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any
from urllib.parse import quote, urlencode

from sandbox.bc import nodes, odata
from sandbox.bc.backend import Backend
from sandbox.bc.etags import etag
from sandbox.bc.fields import EntitySpec, spec_of
from sandbox.bc.store import Company, Row
from sandbox.bc.wire import ApiRequest, ApiResponse


NAVIGATION = {"salesInvoices": ("salesInvoiceLines", "dimensionSetLines"), "salesInvoiceLines": ("dimensionSetLines",),
              "dimensions": ("dimensionValues",)}
"""The parts (navigation properties) of each API page that `$expand` may name."""


def select_expand(r: ApiRequest, spec: EntitySpec) -> tuple[list[str] | None, dict[str, dict]]:
    select = odata.parse_select(r.query["$select"], spec.odata) if "$select" in r.query else None
    expand = parse_expand(r.query.get("$expand") or "", spec.set_name, spec.type_name)
    return select or None, expand


def parse_expand(text: str, set_name: str, type_name: str) -> dict[str, dict]:
    """``$expand``, multi-level (``salesInvoiceLines($expand=dimensionSetLines)``): navigation
    property → what to expand inside it. Only ``$expand`` is taken inside the parentheses (BC
    takes more options there; the simulator refuses them rather than ignore them)."""
    expand: dict[str, dict] = {}
    for item in _top_level(text):
        name, _, inner = item.partition("(")
        name = name.strip()
        if name not in NAVIGATION.get(set_name, ()):
            raise odata.ODataError(f"Could not find a property named '{name}' on type 'Microsoft.NAV.{type_name}'.")
        nested: dict[str, dict] = {}
        if inner:
            if not inner.rstrip().endswith(")"):
                raise odata.ODataError(f"Syntax error in $expand at '{item}'.")
            for option in (o.strip() for o in inner.rstrip()[:-1].split(";") if o.strip()):
                key, _, value = option.partition("=")
                if key.strip() != "$expand":
                    raise odata.ODataError(f"The query option '{key.strip()}' inside $expand is not supported here.")
                child = spec_of(name)
                nested = parse_expand(value, child.set_name, child.type_name)
        expand[name] = nested
    return expand


def _top_level(text: str) -> list[str]:
    """The comma-separated items of an ``$expand``, commas inside parentheses kept."""
    items, depth, current = [], 0, ""
    for char in text:
        if char == "," and depth == 0:
            items.append(current)
            current = ""
            continue
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            raise odata.ODataError("Syntax error in $expand: unbalanced parentheses.")
        current += char
    if depth:
        raise odata.ODataError("Syntax error in $expand: unbalanced parentheses.")
    return [item.strip() for item in items + [current] if item.strip()]


def single(backend: Backend, r: ApiRequest, company: Company | None, set_name: str, row: Row, url: str,
           status: int = 200) -> ApiResponse:
    spec = spec_of(set_name)
    select, expand = select_expand(r, spec)
    context_path = url.rsplit("(", 1)[0]
    body = {"@odata.context": f"{r.service_root}/$metadata#{context_path}/$entity"}
    body.update(backend.present(company, set_name, row, select, expand))
    headers = {"ETag": etag(row.version)}
    if status == 201:
        headers["Location"] = f"{r.service_root}/{url}"
    return ApiResponse(status, body, headers)


def collection(backend: Backend, r: ApiRequest, company: Company | None, spec: EntitySpec, rows: list[Row],
               base: str, default_order: str = "number") -> ApiResponse:
    entity = spec.odata
    select, expand = select_expand(r, spec)
    if r.query.get("$filter"):
        rules = backend.options.filter_rules(r.query.get("$schemaversion"))
        tree = odata.parse_filter(r.query["$filter"])
        nodes.check(tree, entity, rules)
        try:
            predicate = odata.compile_tree(tree, entity, rules)
        except odata.NestedCallError:
            undefined = backend.options.nested_functions_without_2_1
            if undefined == "error":
                raise
            predicate = (lambda fields: False) if undefined == "empty" else (lambda fields: True)
        rows = [row for row in rows if predicate(row.fields)]
    order = [(default_order, False)]
    if r.query.get("$orderby"):
        order = odata.parse_orderby(r.query["$orderby"], entity)
    by_fields = odata.sort_rows([row.fields for row in rows], order, entity)
    by_id = {id(row.fields): row for row in rows}
    rows = [by_id[id(fields)] for fields in by_fields]
    skip, top = _count_option(r, "$skip"), _count_option(r, "$top")
    window = rows[skip:] if top is None else rows[skip:skip + top]
    start = _skiptoken(r.query.get("$skiptoken"))
    page = window[start:start + backend.page_size]
    body: dict[str, Any] = {"@odata.context": f"{r.service_root}/$metadata#{base}"}
    if r.query.get("$count", "").lower() == "true":
        body["@odata.count"] = len(rows)
    body["value"] = [backend.present(company, spec.set_name, row, select, expand) for row in page]
    if start + backend.page_size < len(window):
        query = {k: v for k, v in r.query.items() if k != "$skiptoken"}
        query["$skiptoken"] = base64.urlsafe_b64encode(f"offset:{start + backend.page_size}".encode()).decode()
        body["@odata.nextLink"] = f"{r.service_root}/{base}?" + urlencode(query, quote_via=quote, safe="$,()'=")
    return ApiResponse(200, body)


def _count_option(r: ApiRequest, name: str) -> int | None:
    text = r.query.get(name)
    if text is None:
        return 0 if name == "$skip" else None
    if not text.isdigit():
        raise odata.ODataError(f"Invalid value '{text}' for {name} query option found. "
                               f"The {name} query option requires a non-negative integer value.")
    return int(text)


def _skiptoken(text: str | None) -> int:
    if not text:
        return 0
    try:
        kind, _, number = base64.urlsafe_b64decode(text.encode()).decode().partition(":")
        if kind == "offset" and number.isdigit():
            return int(number)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    raise odata.ODataError("The $skiptoken is not valid.")
