"""A simulated Business Central API v2.0 (customers, items, sales invoices and their lines).

It answers at ``{server}/v2.0/{tenant}/{environment}/api/v2.0/…`` exactly where the real service
answers at ``https://api.businesscentral.dynamics.com/v2.0/…``, so the app only needs
``BC_BASE_URL={server}/v2.0``. The behaviour follows the APIV2 AL pages (field names, which fields
are read-only, the validation messages) and the documented OData behaviour, including the parts
an integration tends to get wrong:

- ``PATCH``/``DELETE`` without ``If-Match`` are refused (400 ``BadRequest_InvalidToken``), a stale
  ETag gets 409 ``Request_EntityChanged``; every change gives the record a new ETag.
- ``$filter`` has BC's limits and case-insensitive text comparison (see `sandbox.odata`).
- ``$batch`` runs its requests in order and stops at the first failure unless
  ``Prefer: odata.continue-on-error``. With ``Isolation: snapshot`` a failure rolls back every
  change of the batch, but — as the BC documentation shows — the requests that ran before the
  failure still report their success (``201`` with an id that no longer exists).
- A created record gets BC's own "API Setup" template for the fields the request left out.

Limits (5 requests at a time per environment, a queue, then 429) come from the `FaultPlan`.
Tests, the demo and the benchmark reach the data directly through the methods of
`BcSimulator`, which are thread-safe.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import json
import math
import re
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sandbox import odata
from sandbox.faults import FaultMiddleware, FaultPlan, Knobs
from sandbox.tokens import BC_AUDIENCE, InvalidToken, verify

LCY_CODE = "USD"
ZERO_GUID = "00000000-0000-0000-0000-000000000000"
MAX_BATCH_REQUESTS = 100
DEFAULT_PAGE_SIZE = 20000
_ID_NAMESPACE = uuid.UUID("5b0f7c3e-7d4a-4b8e-9a57-0c2f1f7d9a10")
_JSON_TYPE = "application/json; odata.metadata=minimal; odata.streaming=true; IEEE754Compatible=false; charset=utf-8"
_INNER_JSON_TYPE = "application/json; odata.metadata=minimal"


class BcError(ValueError):
    """An error answer of the API: HTTP status and BC's ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.status, self.code, self.message = status, code, message


def _not_found(set_name: str, record_id: str) -> BcError:
    return BcError(404, "Internal_RecordNotFound",
                   f"The {_SPECS[set_name].table} does not exist. Identification fields and values: "
                   f"Id='{{{record_id.upper()}}}'")


def _dialog(message: str) -> BcError:
    """An AL ``Error(...)`` raised by the page or table code: BC reports it as 400."""
    return BcError(400, "Application_DialogException", message)


# --- fields -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Field:
    kind: str
    """``text``, ``code`` (upper-cased, like BC Code fields), ``guid``, ``decimal``, ``int``,
    ``bool``, ``date``, ``datetime`` or ``enum``."""
    max_length: int | None = None
    read_only: bool = False
    options: tuple[str, ...] = ()

    @property
    def blank(self) -> Any:
        return {"text": "", "code": "", "guid": ZERO_GUID, "decimal": Decimal(0), "int": 0, "bool": False,
                "date": "0001-01-01", "datetime": "0001-01-01T00:00:00Z"}.get(
                    self.kind, self.options[0] if self.options else "")


def _text(length: int) -> Field:
    return Field("text", length)


def _code(length: int) -> Field:
    return Field("code", length)


def _enum(*options: str) -> Field:
    return Field("enum", options=options)


GUID_F, DEC, INT, BOOL, DATE = Field("guid"), Field("decimal"), Field("int"), Field("bool"), Field("date")
RO_GUID, RO_DEC = Field("guid", read_only=True), Field("decimal", read_only=True)
RO_TEXT, RO_DATETIME = Field("text", read_only=True), Field("datetime", read_only=True)

_ODATA_KIND = {"text": odata.STRING, "code": odata.STRING, "enum": odata.STRING, "guid": odata.GUID,
               "decimal": odata.NUMBER, "int": odata.NUMBER, "bool": odata.BOOL, "date": odata.DATE,
               "datetime": odata.DATETIME}


@dataclass(frozen=True)
class EntitySpec:
    set_name: str
    type_name: str
    table: str
    """The BC table, as BC names it in messages."""
    fields: dict[str, Field]

    @property
    def odata(self) -> odata.EntityType:
        return odata.EntityType(self.type_name, {name: _ODATA_KIND[f.kind] for name, f in self.fields.items()})


COMPANY = EntitySpec("companies", "company", "Company", {
    "id": RO_GUID, "systemVersion": RO_TEXT, "timestamp": Field("int", read_only=True), "name": RO_TEXT,
    "displayName": RO_TEXT, "businessProfileId": RO_TEXT, "systemCreatedAt": RO_DATETIME,
    "systemCreatedBy": RO_GUID, "systemModifiedAt": RO_DATETIME, "systemModifiedBy": RO_GUID,
})

CUSTOMER = EntitySpec("customers", "customer", "Customer", {
    "id": RO_GUID, "number": _code(20), "displayName": _text(100), "type": _enum("Company", "Person"),
    "addressLine1": _text(100), "addressLine2": _text(50), "city": _text(30), "state": _text(30),
    "country": _code(10), "postalCode": _code(20), "phoneNumber": _text(30), "email": _text(80),
    "website": _text(80), "salespersonCode": _code(20), "balanceDue": RO_DEC, "creditLimit": DEC,
    "taxLiable": BOOL, "taxAreaId": GUID_F, "taxAreaDisplayName": RO_TEXT, "taxRegistrationNumber": _text(20),
    "currencyId": GUID_F, "currencyCode": _code(10), "paymentTermsId": GUID_F, "shipmentMethodId": GUID_F,
    "paymentMethodId": GUID_F, "blocked": _enum("_x0020_", "Ship", "Invoice", "All"),
    "lastModifiedDateTime": RO_DATETIME,
})

ITEM = EntitySpec("items", "item", "Item", {
    "id": RO_GUID, "number": _code(20), "displayName": _text(100), "displayName2": _text(50),
    "type": _enum("Inventory", "Service", "Non_x002D_Inventory"), "itemCategoryId": GUID_F,
    "itemCategoryCode": _code(20), "blocked": BOOL, "gtin": _code(14), "inventory": DEC, "unitPrice": DEC,
    "priceIncludesTax": BOOL, "unitCost": DEC, "taxGroupId": GUID_F, "taxGroupCode": _code(20),
    "baseUnitOfMeasureId": GUID_F, "baseUnitOfMeasureCode": _code(10), "generalProductPostingGroupId": GUID_F,
    "generalProductPostingGroupCode": _code(20), "inventoryPostingGroupId": GUID_F,
    "inventoryPostingGroupCode": _code(20), "lastModifiedDateTime": RO_DATETIME,
})

INVOICE_STATUSES = ("Draft", "In_x0020_Review", "Open", "Paid", "Canceled", "Corrective")

INVOICE = EntitySpec("salesInvoices", "salesInvoice", "Sales Header", {
    "id": RO_GUID, "number": Field("code", 20, read_only=True), "externalDocumentNumber": _text(35),
    "invoiceDate": DATE, "postingDate": DATE, "dueDate": DATE, "customerPurchaseOrderReference": _text(35),
    "customerId": GUID_F, "customerNumber": _code(20), "customerName": RO_TEXT, "billToName": RO_TEXT,
    "billToCustomerId": GUID_F, "billToCustomerNumber": _code(20), "shipToName": _text(100),
    "shipToContact": _text(100), "sellToAddressLine1": _text(100), "sellToAddressLine2": _text(50),
    "sellToCity": _text(30), "sellToCountry": _code(10), "sellToState": _text(30), "sellToPostCode": _code(20),
    "billToAddressLine1": RO_TEXT, "billToAddressLine2": RO_TEXT, "billToCity": RO_TEXT,
    "billToCountry": RO_TEXT, "billToState": RO_TEXT, "billToPostCode": RO_TEXT,
    "shipToAddressLine1": _text(100), "shipToAddressLine2": _text(50), "shipToCity": _text(30),
    "shipToCountry": _code(10), "shipToState": _text(30), "shipToPostCode": _code(20), "currencyId": GUID_F,
    "shortcutDimension1Code": _code(20), "shortcutDimension2Code": _code(20), "currencyCode": _code(10),
    "orderId": RO_GUID, "orderNumber": RO_TEXT, "paymentTermsId": GUID_F, "shipmentMethodId": GUID_F,
    "salesperson": _code(20), "pricesIncludeTax": Field("bool", read_only=True), "remainingAmount": RO_DEC,
    "discountAmount": DEC, "discountAppliedBeforeTax": Field("bool", read_only=True),
    "totalAmountExcludingTax": RO_DEC, "totalTaxAmount": RO_DEC, "totalAmountIncludingTax": RO_DEC,
    "status": Field("enum", read_only=True, options=INVOICE_STATUSES), "lastModifiedDateTime": RO_DATETIME,
    "phoneNumber": _text(30), "email": _text(80),
})

LINE = EntitySpec("salesInvoiceLines", "salesInvoiceLine", "Sales Line", {
    "id": RO_GUID, "documentId": GUID_F, "sequence": INT, "itemId": GUID_F, "accountId": GUID_F,
    "lineType": _enum("Comment", "Account", "Item", "Resource", "Value", "Charge"),
    "lineObjectNumber": _code(20), "description": _text(100), "unitOfMeasureId": GUID_F,
    "unitOfMeasureCode": _code(10), "unitPrice": DEC, "quantity": DEC, "discountAmount": DEC,
    "discountPercent": DEC, "discountAppliedBeforeTax": Field("bool", read_only=True),
    "amountExcludingTax": RO_DEC, "taxCode": _code(20), "taxPercent": RO_DEC, "totalTaxAmount": RO_DEC,
    "amountIncludingTax": RO_DEC, "invoiceDiscountAllocation": RO_DEC, "netAmount": RO_DEC,
    "netTaxAmount": RO_DEC, "netAmountIncludingTax": RO_DEC, "shipmentDate": DATE, "itemVariantId": GUID_F,
    "locationId": GUID_F,
})

_SPECS = {spec.set_name: spec for spec in (CUSTOMER, ITEM, INVOICE, LINE)}

_CODE_IDS = {
    "customers": {"currencyCode": "currencyId"},
    "items": {"itemCategoryCode": "itemCategoryId", "taxGroupCode": "taxGroupId",
              "baseUnitOfMeasureCode": "baseUnitOfMeasureId",
              "generalProductPostingGroupCode": "generalProductPostingGroupId",
              "inventoryPostingGroupCode": "inventoryPostingGroupId"},
}
"""Code fields whose setup record id BC fills in too (the simulator derives a stable id)."""

_SERIES_INDEX = {"customers": "customers", "items": "items", "salesInvoices": "salesInvoices",
                 "postedSalesInvoices": "salesInvoices"}
"""The number index a series must not collide with (drafts and posted invoices share one)."""

_SERIES = {"customers": ("C", 10, 5, 10), "items": ("", 1000, 0, 1), "salesInvoices": ("S-INV", 100001, 0, 1),
           "postedSalesInvoices": ("PS-INV", 103001, 0, 1)}
"""Number series: prefix, first number, digits (0: as is), increment."""


def _option_label(option: str) -> str:
    return re.sub(r"_x([0-9A-Fa-f]{4})_", lambda m: chr(int(m.group(1), 16)), option)


def _coerce_value(spec: EntitySpec, name: str, f: Field, value: Any) -> Any:
    """A JSON value converted to the field's type, or the error BC gives for it."""
    if value is None:
        return f.blank
    if f.kind in ("text", "code"):
        if not isinstance(value, str):
            raise BcError(400, "BadRequest", f"Cannot convert a primitive value to the expected type 'Edm.String' "
                                             f"(property '{name}').")
        if f.max_length is not None and len(value) > f.max_length:
            raise BcError(400, "Application_StringExceededLength",
                          f"The length of the string is {len(value)}, but it must be less than or equal to "
                          f"{f.max_length} characters. Value: {value}")
        return value.upper() if f.kind == "code" else value
    if f.kind == "guid":
        if not isinstance(value, str) or not odata.is_guid(value):
            raise BcError(400, "BadRequest", f"Cannot convert the literal '{value}' to the expected type 'Edm.Guid' "
                                             f"(property '{name}').")
        return value.lower()
    if f.kind in ("decimal", "int"):
        allowed = int if f.kind == "int" else (int, float)
        if isinstance(value, bool) or not isinstance(value, allowed) or not math.isfinite(value):
            edm = "Edm.Int32" if f.kind == "int" else "Edm.Decimal"
            raise BcError(400, "BadRequest", f"Cannot convert the literal '{value}' to the expected type '{edm}' "
                                             f"(property '{name}').")
        return value if f.kind == "int" else Decimal(str(value))
    if f.kind == "bool":
        if not isinstance(value, bool):
            raise BcError(400, "BadRequest", f"Cannot convert the literal '{value}' to the expected type "
                                             f"'Edm.Boolean' (property '{name}').")
        return value
    if f.kind == "date":
        try:
            if isinstance(value, str) and len(value) == 10:
                return dt.date.fromisoformat(value).isoformat()
        except ValueError:
            pass
        raise BcError(400, "BadRequest", f"Cannot convert the literal '{value}' to the expected type 'Edm.Date' "
                                         f"(property '{name}').")
    if f.kind == "enum":
        if value == " " and "_x0020_" in f.options:
            return "_x0020_"
        if value not in f.options:
            labels = ",".join(_option_label(o).strip() or " " for o in f.options)
            raise BcError(400, "Unknown", f"'{value}' is not an option. The existing options are: {labels}")
        return value
    raise BcError(400, "BadRequest", f"The property '{name}' cannot be set.")


def coerce_body(spec: EntitySpec, body: Any, navigation: tuple[str, ...] = ()) -> dict[str, Any]:
    """Check a POST/PATCH body against the entity: unknown and read-only fields, types, lengths."""
    if not isinstance(body, dict):
        raise BcError(400, "BadRequest", "Invalid Request Body")
    values: dict[str, Any] = {}
    for name, value in body.items():
        if name.startswith("@odata.") or name in navigation:
            continue
        f = spec.fields.get(name)
        if f is None:
            raise BcError(400, "BadRequest",
                          f"The property '{name}' does not exist on type 'Microsoft.NAV.{spec.type_name}'. "
                          "Make sure to only use property names that are defined by the type.")
        if f.read_only:
            raise BcError(400, "BadRequest_InvalidOperation", f"Control '{name}' is read-only.")
        values[name] = _coerce_value(spec, name, f, value)
    return values


def _json_value(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def _money(value: Decimal) -> Decimal:
    return value.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _derived_id(kind: str, code: str) -> str:
    return str(uuid.uuid5(_ID_NAMESPACE, f"{kind}:{code}")) if code else ZERO_GUID


# --- state ------------------------------------------------------------------------------------

_MISSING = object()


@dataclass
class Row:
    """A stored record: its public field values and its row version (the source of its ETag)."""

    fields: dict[str, Any]
    version: int


@dataclass
class Company:
    id: str
    tenant: str
    environment: str
    row: Row
    tables: dict[str, dict[str, Row]] = field(default_factory=lambda: {name: {} for name in _SPECS})
    numbers: dict[str, dict[str, str]] = field(
        default_factory=lambda: {"customers": {}, "items": {}, "salesInvoices": {}})
    """Number → id, for the entities whose number is a key."""
    lines_of: dict[str, dict[str, None]] = field(default_factory=dict)
    """Invoice id → its line ids."""
    series: dict[str, int] = field(default_factory=dict)


class _Journal:
    """Undo log, so that a failed request, deep insert or snapshot batch leaves no trace."""

    def __init__(self) -> None:
        self.entries: list[tuple[dict, Any, Any]] = []
        self.creates: list[str] = []

    def set(self, container: dict, key: Any, value: Any) -> None:
        self.entries.append((container, key, container.get(key, _MISSING)))
        if value is _MISSING:
            container.pop(key, None)
        else:
            container[key] = value

    def mark(self) -> tuple[int, int]:
        return len(self.entries), len(self.creates)

    def rollback(self, mark: tuple[int, int]) -> None:
        while len(self.entries) > mark[0]:
            container, key, old = self.entries.pop()
            if old is _MISSING:
                container.pop(key, None)
            else:
                container[key] = old
        del self.creates[mark[1]:]


class _Rollback(Exception):
    """Raised inside a snapshot batch to undo everything it did."""


# --- requests ---------------------------------------------------------------------------------

_NO_BODY = object()
_BAD_BODY = object()


@dataclass
class ApiRequest:
    """One API call, from HTTP or from inside a ``$batch``; `path` is relative to ``/api/v2.0/``."""

    method: str
    tenant: str
    environment: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    service_root: str
    """Absolute ``…/v2.0/{tenant}/{environment}/api/v2.0``, for links and ``@odata.context``."""


@dataclass
class ApiResponse:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


def _error_response(error: BcError) -> ApiResponse:
    return ApiResponse(error.status, {"error": {"code": error.code, "message": error.message}})


_SEGMENT = re.compile(r"^(?P<name>[A-Za-z][A-Za-z0-9_.]*)(?:\((?P<key>[^()]*)\))?$")
_ETAG = re.compile(r"^'\d+;\d+;\d+;'$")


def _key(text: str | None) -> str | None:
    if text is None:
        return None
    text = text.strip()
    if "=" in text:
        name, _, text = text.partition("=")
        if name.strip() != "id":
            raise BcError(400, "BadRequest_NotFound", "Bad Request - Error in query syntax.")
        text = text.strip()
    if not odata.is_guid(text):
        raise BcError(400, "BadRequest_NotFound", f"'|' or ',' expected at position 1 in ({text}).")
    return text.lower()


class _Backend:
    """The whole state and every operation on it. Not thread-safe: `BcSimulator` holds the lock."""

    def __init__(self, page_size: int):
        self.page_size = page_size
        self.companies: dict[str, Company] = {}
        self.environments: set[tuple[str, str]] = set()
        self.templates: dict[str, dict[str, Any]] = {"customers": {}, "items": {}}
        self.creates: Counter = Counter()
        self._journal = _Journal()
        self._depth = 0
        self._rowversion = 24_000_000

    # transactions

    @contextmanager
    def atomic(self, count: bool = True) -> Iterator[None]:
        """All-or-nothing; the outermost block commits (and counts API creations)."""
        mark = self._journal.mark()
        self._depth += 1
        try:
            yield
        except BaseException:
            self._journal.rollback(mark)
            raise
        finally:
            self._depth -= 1
        if self._depth == 0:
            if count:
                self.creates.update(self._journal.creates)
            self._journal = _Journal()

    def _version(self) -> int:
        self._rowversion += 1
        return self._rowversion

    def _put(self, company: Company, set_name: str, record_id: str, fields: dict[str, Any]) -> Row:
        if "lastModifiedDateTime" in _SPECS[set_name].fields:
            fields["lastModifiedDateTime"] = _now()
        row = Row(fields, self._version())
        self._journal.set(company.tables[set_name], record_id, row)
        return row

    def _next_number(self, company: Company, series: str) -> str:
        prefix, start, digits, step = _SERIES[series]
        taken = company.numbers[_SERIES_INDEX[series]]
        current = company.series.get(series, start - step)
        while True:
            current += step
            number = f"{prefix}{current:0{digits}d}" if digits else f"{prefix}{current}"
            if number not in taken:
                break
        self._journal.set(company.series, series, current)
        return number

    def _index_number(self, company: Company, set_name: str, number: str, record_id: str | None,
                      old_number: str | None = None) -> None:
        index = company.numbers[set_name]
        if number in index and index[number] != record_id:
            raise BcError(400, "Internal_EntityWithSameKeyExists",
                          f"The record in table {_SPECS[set_name].table} already exists. "
                          f"Identification fields and values: No.='{number}'")
        if old_number is not None and old_number != number:
            self._journal.set(index, old_number, _MISSING)
        self._journal.set(index, number, record_id)

    # environments and companies

    def add_company(self, tenant: str, environment: str, company_id: str | None, name: str | None) -> str:
        company_id = (company_id or str(uuid.uuid4())).lower()
        if not odata.is_guid(company_id) or company_id in self.companies:
            raise ValueError(f"company id {company_id!r} is not a new GUID")
        taken = {c.row.fields["name"] for c in self._companies_of(tenant, environment)}
        if name is None:
            name, counter = "CRONUS USA, Inc.", 1
            while name in taken:
                counter += 1
                name = f"CRONUS USA, Inc. ({counter})"
        now = _now()
        fields = {"id": company_id, "systemVersion": "26.0.30643.32481", "timestamp": 0, "name": name,
                  "displayName": name, "businessProfileId": "", "systemCreatedAt": now,
                  "systemCreatedBy": ZERO_GUID, "systemModifiedAt": now, "systemModifiedBy": ZERO_GUID}
        version = self._version()
        fields["timestamp"] = version
        self.companies[company_id] = Company(company_id, tenant.lower(), environment.lower(), Row(fields, version))
        self.environments.add((tenant.lower(), environment.lower()))
        return company_id

    def _companies_of(self, tenant: str, environment: str) -> list[Company]:
        return [c for c in self.companies.values()
                if c.tenant == tenant.lower() and c.environment == environment.lower()]

    def company(self, company_id: str, tenant: str | None = None, environment: str | None = None) -> Company:
        company = self.companies.get(company_id.lower())
        if company is None or (tenant is not None and (company.tenant, company.environment)
                               != (tenant.lower(), (environment or "").lower())):
            raise BcError(404, "Internal_CompanyNotFound", f"The company '{company_id}' does not exist.")
        return company

    def row(self, company: Company, set_name: str, record_id: str) -> Row:
        row = company.tables[set_name].get(record_id)
        if row is None:
            raise _not_found(set_name, record_id)
        return row

    # customers and items

    def create_master(self, company: Company, spec: EntitySpec, body: Any, *, api: bool) -> Row:
        """A customer or an item (both are keyed by number and have a required display name)."""
        values = coerce_body(spec, body)
        if not values.get("displayName", "").strip():
            raise _dialog('A "displayName" must be provided.')
        if spec is ITEM and "inventory" in values:
            raise _dialog("Inventory cannot be changed during on insert.")
        if api:
            for name, default in self.templates[spec.set_name].items():
                values.setdefault(name, default)
        fields = {name: f.blank for name, f in spec.fields.items()}
        if spec is CUSTOMER:
            fields["currencyCode"] = LCY_CODE
        self._derive_ids(spec, values)
        fields.update(values)
        record_id = str(uuid.uuid4())
        fields["id"] = record_id
        fields["number"] = values.get("number") or self._next_number(company, spec.set_name)
        self._index_number(company, spec.set_name, fields["number"], record_id)
        row = self._put(company, spec.set_name, record_id, fields)
        if api:
            self._journal.creates.append(spec.set_name)
        return row

    @staticmethod
    def _derive_ids(spec: EntitySpec, values: dict[str, Any]) -> None:
        for code_field, id_field in _CODE_IDS.get(spec.set_name, {}).items():
            if code_field in values and id_field not in values:
                code = values[code_field]
                values[id_field] = ZERO_GUID if code in ("", LCY_CODE) and code_field == "currencyCode" \
                    else _derived_id(code_field, code)

    def modify_master(self, company: Company, spec: EntitySpec, row: Row, body: Any) -> Row:
        values = coerce_body(spec, body)
        if "displayName" in values and not values["displayName"].strip():
            raise _dialog('The blank "displayName" is not allowed.')
        self._derive_ids(spec, values)
        fields = dict(row.fields)
        if "number" in values and values["number"] != fields["number"]:
            if not values["number"]:
                raise _dialog(f"The {spec.table} number cannot be blank.")
            self._index_number(company, spec.set_name, values["number"], fields["id"], fields["number"])
        fields.update(values)
        return self._put(company, spec.set_name, fields["id"], fields)

    def delete_master(self, company: Company, spec: EntitySpec, row: Row) -> None:
        record_id, number = row.fields["id"], row.fields["number"]
        for invoice in company.tables["salesInvoices"].values():
            if invoice.fields["status"] != "Draft":
                continue
            if spec is CUSTOMER and record_id in (invoice.fields["customerId"], invoice.fields["billToCustomerId"]):
                raise _dialog(f"You cannot delete Customer {number} because there is at least one outstanding "
                              "Sales Invoice for this customer.")
            if spec is ITEM and any(company.tables["salesInvoiceLines"][line_id].fields["itemId"] == record_id
                                    for line_id in company.lines_of.get(invoice.fields["id"], {})):
                raise _dialog(f"You cannot delete Item {number} because there is at least one outstanding "
                              "Sales Invoice that includes this item.")
        self._journal.set(company.numbers[spec.set_name], number, _MISSING)
        self._journal.set(company.tables[spec.set_name], record_id, _MISSING)

    # sales invoices

    def _customer(self, company: Company, customer_id: str | None, number: str | None, role: str) -> Row:
        customer_id = None if customer_id == ZERO_GUID else customer_id
        found = company.tables["customers"].get(customer_id) if customer_id else None
        if customer_id and found is None:
            raise _dialog(f"The {role} customer cannot be found.")
        if number:
            by_number = company.numbers["customers"].get(number)
            if by_number is None:
                raise _dialog(f"The {role} customer cannot be found.")
            if found is not None and found.fields["id"] != by_number:
                raise _dialog(f"The {role} customer values do not match to a specific Customer.")
            found = company.tables["customers"][by_number]
        if found is None:
            raise _dialog(f"The {role} customer must be given by its number or its id.")
        return found

    def create_invoice(self, company: Company, body: Any, *, api: bool) -> Row:
        values = coerce_body(INVOICE, body, navigation=("salesInvoiceLines",))
        lines = body.get("salesInvoiceLines", [])
        if not isinstance(lines, list) or not all(isinstance(line, dict) for line in lines):
            raise BcError(400, "BadRequest", "Invalid Request Body: 'salesInvoiceLines' must be an array of objects.")
        if values.get("customerId", ZERO_GUID) == ZERO_GUID and not values.get("customerNumber"):
            raise _dialog('A "customerNumber" or a "customerId" must be provided.')
        fields = {name: f.blank for name, f in INVOICE.fields.items()}
        record_id = str(uuid.uuid4())
        today = dt.date.today().isoformat()
        fields.update(id=record_id, status="Draft", invoiceDate=today, postingDate=today, dueDate=today,
                      discountAppliedBeforeTax=True)
        self._apply_customers(company, fields, values, new=True)
        fields.update({k: v for k, v in values.items() if k not in ("customerId", "customerNumber",
                                                                     "billToCustomerId", "billToCustomerNumber")})
        if "invoiceDate" in values and "dueDate" not in values:
            fields["dueDate"] = values["invoiceDate"]
        fields["number"] = self._next_number(company, "salesInvoices")
        self._index_number(company, "salesInvoices", fields["number"], record_id)
        self._put(company, "salesInvoices", record_id, fields)
        self._journal.set(company.lines_of, record_id, {})
        if api:
            self._journal.creates.append("salesInvoices")
        for line in lines:
            self.create_line(company, record_id, line, api=api)
        return self._recalculate(company, record_id)

    def _apply_customers(self, company: Company, fields: dict[str, Any], values: dict[str, Any], new: bool) -> None:
        """Sell-to and bill-to customer and everything BC copies from them onto the header."""
        sell_to_given = any(k in values for k in ("customerId", "customerNumber"))
        if sell_to_given:
            customer = self._customer(company, values.get("customerId"), values.get("customerNumber"), "sell-to")
            c = customer.fields
            if c["blocked"] == "All":
                raise _dialog(f"You cannot create this type of document when Customer {c['number']} is blocked "
                              "with type All")
            fields.update(customerId=c["id"], customerNumber=c["number"], customerName=c["displayName"],
                          shipToName=c["displayName"], sellToAddressLine1=c["addressLine1"],
                          sellToAddressLine2=c["addressLine2"], sellToCity=c["city"], sellToCountry=c["country"],
                          sellToState=c["state"], sellToPostCode=c["postalCode"],
                          shipToAddressLine1=c["addressLine1"], shipToAddressLine2=c["addressLine2"],
                          shipToCity=c["city"], shipToCountry=c["country"], shipToState=c["state"],
                          shipToPostCode=c["postalCode"], currencyId=c["currencyId"],
                          currencyCode=c["currencyCode"] or LCY_CODE, paymentTermsId=c["paymentTermsId"],
                          shipmentMethodId=c["shipmentMethodId"], salesperson=c["salespersonCode"],
                          phoneNumber=c["phoneNumber"], email=c["email"])
        bill_to_given = any(k in values for k in ("billToCustomerId", "billToCustomerNumber"))
        if bill_to_given or (new or sell_to_given):
            if bill_to_given:
                bill_to = self._customer(company, values.get("billToCustomerId"),
                                         values.get("billToCustomerNumber"), "bill-to").fields
            else:
                bill_to = company.tables["customers"][fields["customerId"]].fields
            fields.update(billToCustomerId=bill_to["id"], billToCustomerNumber=bill_to["number"],
                          billToName=bill_to["displayName"], billToAddressLine1=bill_to["addressLine1"],
                          billToAddressLine2=bill_to["addressLine2"], billToCity=bill_to["city"],
                          billToCountry=bill_to["country"], billToState=bill_to["state"],
                          billToPostCode=bill_to["postalCode"])

    def _draft(self, company: Company, invoice_id: str) -> Row:
        invoice = self.row(company, "salesInvoices", invoice_id)
        if invoice.fields["status"] != "Draft":
            raise _dialog(f"The sales invoice {invoice.fields['number']} is posted ({invoice.fields['status']}); "
                          "only draft invoices can be changed.")
        return invoice

    def modify_invoice(self, company: Company, row: Row, body: Any) -> Row:
        if isinstance(body, dict) and "salesInvoiceLines" in body:
            raise BcError(400, "BadRequest", "Navigation property 'salesInvoiceLines' cannot be set with PATCH; "
                                             "use the salesInvoiceLines entity set.")
        values = coerce_body(INVOICE, body)
        self._draft(company, row.fields["id"])
        fields = dict(row.fields)
        self._apply_customers(company, fields, values, new=False)
        fields.update({k: v for k, v in values.items() if k not in ("customerId", "customerNumber",
                                                                     "billToCustomerId", "billToCustomerNumber")})
        self._put(company, "salesInvoices", fields["id"], fields)
        return self._recalculate(company, fields["id"])

    def delete_invoice(self, company: Company, invoice_id: str) -> None:
        invoice = self._draft(company, invoice_id)
        for line_id in list(company.lines_of.get(invoice_id, {})):
            self._journal.set(company.tables["salesInvoiceLines"], line_id, _MISSING)
        self._journal.set(company.lines_of, invoice_id, _MISSING)
        self._journal.set(company.numbers["salesInvoices"], invoice.fields["number"], _MISSING)
        self._journal.set(company.tables["salesInvoices"], invoice_id, _MISSING)

    def post_invoice(self, company: Company, invoice_id: str) -> Row:
        invoice = self._draft(company, invoice_id)
        lines = [company.tables["salesInvoiceLines"][i].fields for i in company.lines_of.get(invoice_id, {})]
        if not any(line["lineType"] != "Comment" and line["quantity"] for line in lines):
            raise _dialog("There is nothing to post.")
        fields = dict(invoice.fields)
        number = self._next_number(company, "postedSalesInvoices")
        self._index_number(company, "salesInvoices", number, invoice_id, fields["number"])
        fields.update(number=number, status="Open")
        self._put(company, "salesInvoices", invoice_id, fields)
        return self._recalculate(company, invoice_id)

    def _recalculate(self, company: Company, invoice_id: str) -> Row:
        """Header totals from the lines (no tax in the simulated company)."""
        invoice = company.tables["salesInvoices"][invoice_id]
        lines = [company.tables["salesInvoiceLines"][i].fields for i in company.lines_of.get(invoice_id, {})]
        lines_total = sum((line["amountExcludingTax"] for line in lines), Decimal(0))
        total = _money(lines_total - invoice.fields["discountAmount"])
        totals = {"totalAmountExcludingTax": total, "totalTaxAmount": Decimal(0),
                  "totalAmountIncludingTax": total, "remainingAmount": total}
        if all(invoice.fields[k] == v for k, v in totals.items()):
            return invoice
        return self._put(company, "salesInvoices", invoice_id, {**invoice.fields, **totals})

    # sales invoice lines

    def create_line(self, company: Company, invoice_id: str, body: Any, *, api: bool) -> Row:
        invoice = self._draft(company, invoice_id)
        values = coerce_body(LINE, body)
        if values.get("documentId", invoice_id) != invoice_id:
            raise _dialog('The value for "documentId" cannot be modified.')
        fields = {name: f.blank for name, f in LINE.fields.items()}
        fields.update(id=str(uuid.uuid4()), documentId=invoice_id, discountAppliedBeforeTax=True)
        self._apply_line_object(company, fields, values)
        existing = [company.tables["salesInvoiceLines"][i].fields["sequence"] for i in company.lines_of[invoice_id]]
        fields["sequence"] = values.get("sequence") or (max(existing, default=0) + 10000)
        if fields["sequence"] in existing:
            raise BcError(400, "Internal_EntityWithSameKeyExists",
                          "The record in table Sales Line already exists. Identification fields and values: "
                          f"Document Type='Invoice',Document No.='{invoice.fields['number']}',"
                          f"Line No.='{fields['sequence']}'")
        fields.update({k: v for k, v in values.items() if k not in ("itemId", "accountId", "lineType",
                                                                     "lineObjectNumber", "sequence")})
        _line_amounts(fields, "discountAmount" in values)
        row = self._put(company, "salesInvoiceLines", fields["id"], fields)
        self._journal.set(company.lines_of[invoice_id], fields["id"], None)
        if api:
            self._journal.creates.append("salesInvoiceLines")
        self._recalculate(company, invoice_id)
        return row

    def _apply_line_object(self, company: Company, fields: dict[str, Any], values: dict[str, Any]) -> None:
        """Line type and the item (or account) it sells, with what BC copies from the item."""
        if values.get("itemId") and values.get("accountId"):
            raise _dialog('Both "itemId" and "accountId" are specified. Specify only one of them.')
        if "itemId" in values:
            line_type = "Item"
        elif "accountId" in values:
            line_type = "Account"
        else:
            line_type = values.get("lineType", "Comment")
        fields["lineType"] = line_type
        if line_type == "Item":
            item_id = values.get("itemId")
            if item_id is None and values.get("lineObjectNumber"):
                item_id = company.numbers["items"].get(values["lineObjectNumber"])
            item = company.tables["items"].get(item_id or "")
            if item is None:
                raise _dialog("Item does not exist.")
            i = item.fields
            if i["blocked"]:
                raise BcError(400, "Application_FieldValidationException",
                              f"Blocked must be equal to 'No'  in Item: No.={i['number']}. Current value is 'Yes'.")
            fields.update(itemId=i["id"], lineObjectNumber=i["number"], description=i["displayName"],
                          unitPrice=i["unitPrice"], unitOfMeasureCode=i["baseUnitOfMeasureCode"],
                          unitOfMeasureId=i["baseUnitOfMeasureId"])
        elif line_type == "Account":
            fields.update(accountId=values.get("accountId", ZERO_GUID),
                          lineObjectNumber=values.get("lineObjectNumber", ""))
        else:
            fields["lineObjectNumber"] = values.get("lineObjectNumber", "")

    def modify_line(self, company: Company, row: Row, body: Any) -> Row:
        values = coerce_body(LINE, body)
        old = row.fields
        self._draft(company, old["documentId"])
        if values.get("documentId", old["documentId"]) != old["documentId"]:
            raise _dialog('The value for "documentId" cannot be modified.')
        if values.get("sequence", old["sequence"]) != old["sequence"]:
            raise _dialog('The value for "sequence" cannot be modified. Delete and insert the line again.')
        for name in ("lineObjectNumber", "itemId", "accountId", "lineType"):
            if name in values and values[name] != old[name] and old["lineObjectNumber"]:
                raise _dialog('The value for "lineObjectNumber" cannot be modified.')
        fields = dict(old)
        if any(name in values for name in ("lineObjectNumber", "itemId", "accountId", "lineType")):
            self._apply_line_object(company, fields, values)
        fields.update({k: v for k, v in values.items() if k not in ("itemId", "accountId", "lineType",
                                                                     "lineObjectNumber")})
        _line_amounts(fields, "discountAmount" in values)
        row = self._put(company, "salesInvoiceLines", fields["id"], fields)
        self._recalculate(company, fields["documentId"])
        return row

    def delete_line(self, company: Company, row: Row) -> None:
        invoice_id = row.fields["documentId"]
        self._draft(company, invoice_id)
        self._journal.set(company.lines_of[invoice_id], row.fields["id"], _MISSING)
        self._journal.set(company.tables["salesInvoiceLines"], row.fields["id"], _MISSING)
        self._recalculate(company, invoice_id)

    # presentation

    def present(self, company: Company | None, set_name: str, row: Row, select: list[str] | None = None,
                expand: bool = False) -> dict[str, Any]:
        spec = _SPECS.get(set_name, COMPANY)
        names = select or list(spec.fields)
        result: dict[str, Any] = {"@odata.etag": etag(row.version)}
        result.update((name, _json_value(row.fields[name])) for name in names)
        if expand and company is not None:
            result["salesInvoiceLines"] = [self.present(company, "salesInvoiceLines", line)
                                           for line in self.lines(company, row.fields["id"])]
        return result

    def lines(self, company: Company, invoice_id: str) -> list[Row]:
        rows = [company.tables["salesInvoiceLines"][i] for i in company.lines_of.get(invoice_id, {})]
        return sorted(rows, key=lambda row: row.fields["sequence"])


def _line_amounts(fields: dict[str, Any], amount_given: bool) -> None:
    """Line amounts (no tax in the simulated company); a discount percent wins unless the request
    set the discount amount itself."""
    if fields["lineType"] == "Comment":
        fields.update(quantity=Decimal(0), unitPrice=Decimal(0))
    gross = fields["quantity"] * fields["unitPrice"]
    if fields["discountPercent"] and not amount_given:
        fields["discountAmount"] = _money(gross * fields["discountPercent"] / 100)
    amount = _money(gross - fields["discountAmount"])
    fields.update(amountExcludingTax=amount, taxPercent=Decimal(0), totalTaxAmount=Decimal(0),
                  amountIncludingTax=amount, invoiceDiscountAllocation=Decimal(0), netAmount=amount,
                  netTaxAmount=Decimal(0), netAmountIncludingTax=amount)


def etag(version: int) -> str:
    """BC-shaped weak ETag (base64 of ``'<length>;<row version>;00;'``)."""
    text = f"'{len(str(version))};{version};00;'"
    return 'W/"' + base64.b64encode(text.encode()).decode() + '"'


def _etag_matches(header: str, version: int) -> bool:
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
            raise _invalid_token()
    return False


def _invalid_token() -> BcError:
    return BcError(400, "BadRequest_InvalidToken", "Could not validate the client concurrency token required by "
                                                   "the service. Please provide a valid token in the client request.")


# --- the API --------------------------------------------------------------------------------

class _Api:
    """Routes one `ApiRequest` to the backend and shapes the OData answer."""

    def __init__(self, backend: _Backend):
        self.b = backend

    def handle(self, request: ApiRequest) -> ApiResponse:
        try:
            with self.b.atomic():
                return self._dispatch(request)
        except BcError as error:
            return _error_response(error)
        except odata.ODataError as error:
            return _error_response(BcError(400, "BadRequest", str(error)))

    def _dispatch(self, r: ApiRequest) -> ApiResponse:
        segments = []
        for text in [s for s in r.path.split("/") if s]:
            match = _SEGMENT.match(text)
            if not match:
                raise BcError(404, "BadRequest_ResourceNotFound", f"Resource not found for the segment '{text}'.")
            segments.append((match.group("name"), match.group("key")))
        if not segments or segments[0][0] != "companies":
            name = segments[0][0] if segments else ""
            raise BcError(404, "BadRequest_ResourceNotFound", f"Resource not found for the segment '{name}'.")
        company_key = _key(segments[0][1])
        if company_key is None:
            if len(segments) > 1:
                raise BcError(400, "BadRequest", "A company id is required: companies({id})/….")
            return self._companies(r)
        company = self.b.company(company_key, r.tenant, r.environment)
        if len(segments) == 1:
            self._only(r, "GET", "companies")
            return self._single(r, company, "companies", company.row, f"companies({company.id})")
        return self._entities(r, company, segments[1:])

    @staticmethod
    def _only(r: ApiRequest, method: str, what: str) -> None:
        if r.method != method:
            raise BcError(405, "BadRequest_MethodNotAllowed",
                          f"'{r.method}' requests for '{what}' are not allowed within Dynamics 365 Business "
                          "Central OData web services.")

    def _companies(self, r: ApiRequest) -> ApiResponse:
        self._only(r, "GET", "companies")
        companies = [c for c in self.b.companies.values()
                     if (c.tenant, c.environment) == (r.tenant.lower(), r.environment.lower())]
        rows = {c.id: c.row for c in companies}
        return self._collection(r, None, COMPANY, list(rows.values()), "companies", default_order="name")

    def _entities(self, r: ApiRequest, company: Company, segments: list[tuple[str, str | None]]) -> ApiResponse:
        (name, key), rest = segments[0], segments[1:]
        base = f"companies({company.id})/{name}"
        if name not in _SPECS:
            raise BcError(404, "BadRequest_ResourceNotFound", f"Resource not found for the segment '{name}'.")
        record_id = _key(key)
        if name == "salesInvoiceLines":
            return self._lines(r, company, None, record_id, rest, base)
        if record_id is None:
            if rest:
                raise BcError(400, "BadRequest", f"An id is required: {name}({{id}})/….")
            if r.method == "GET":
                rows = list(company.tables[name].values())
                return self._collection(r, company, _SPECS[name], rows, base)
            self._only(r, "POST", name)
            body = self._body(r)
            if name == "salesInvoices":
                row = self.b.create_invoice(company, body, api=True)
            else:
                row = self.b.create_master(company, _SPECS[name], body, api=True)
            return self._single(r, company, name, row, f"{base}({row.fields['id']})", status=201)
        row = self.b.row(company, name, record_id)
        if rest:
            if name != "salesInvoices":
                raise BcError(404, "BadRequest_ResourceNotFound", f"Resource not found for the segment '{rest[0][0]}'.")
            sub, sub_key = rest[0]
            if sub == "salesInvoiceLines":
                return self._lines(r, company, record_id, _key(sub_key), rest[1:], f"{base}({record_id})/{sub}")
            if sub.lower() == "microsoft.nav.post" and len(rest) == 1:
                self._only(r, "POST", sub)
                self.b.post_invoice(company, record_id)
                return ApiResponse(204)
            raise BcError(404, "BadRequest_ResourceNotFound", f"Resource not found for the segment '{sub}'.")
        spec = _SPECS[name]
        url = f"{base}({record_id})"
        if r.method == "GET":
            return self._single(r, company, name, row, url)
        if r.method == "PATCH":
            self._if_match(r, row)
            body = self._body(r)
            row = self.b.modify_invoice(company, row, body) if spec is INVOICE \
                else self.b.modify_master(company, spec, row, body)
            return self._single(r, company, name, row, url)
        if r.method == "DELETE":
            self._if_match(r, row)
            if spec is INVOICE:
                self.b.delete_invoice(company, record_id)
            else:
                self.b.delete_master(company, spec, row)
            return ApiResponse(204)
        raise BcError(405, "BadRequest_MethodNotAllowed",
                      f"'{r.method}' requests for '{name}' are not allowed within Dynamics 365 Business Central "
                      "OData web services.")

    def _lines(self, r: ApiRequest, company: Company, invoice_id: str | None, line_id: str | None,
               rest: list, base: str) -> ApiResponse:
        if rest:
            raise BcError(404, "BadRequest_ResourceNotFound", f"Resource not found for the segment '{rest[0][0]}'.")
        table = company.tables["salesInvoiceLines"]
        if line_id is None:
            if r.method == "GET":
                if invoice_id is None:
                    filter_text = r.query.get("$filter")
                    if not filter_text or "documentId" not in odata.filter_fields(filter_text):
                        raise _dialog("You must specify an Id or a Document Id to get the lines.")
                    rows = list(table.values())
                else:
                    rows = self.b.lines(company, invoice_id)
                return self._collection(r, company, LINE, rows, base, default_order="sequence")
            self._only(r, "POST", "salesInvoiceLines")
            body = self._body(r)
            target = invoice_id
            if target is None:
                document_id = body.get("documentId") if isinstance(body, dict) else None
                if not isinstance(document_id, str) or not odata.is_guid(document_id):
                    raise _dialog("You must specify a parent ID (documentId) to create a line.")
                target = document_id.lower()
            self.b.row(company, "salesInvoices", target)
            row = self.b.create_line(company, target, body, api=True)
            return self._single(r, company, "salesInvoiceLines", row, f"{base}({row.fields['id']})", status=201)
        row = self.b.row(company, "salesInvoiceLines", line_id)
        if invoice_id is not None and row.fields["documentId"] != invoice_id:
            raise _not_found("salesInvoiceLines", line_id)
        url = f"{base}({line_id})"
        if r.method == "GET":
            return self._single(r, company, "salesInvoiceLines", row, url)
        if r.method == "PATCH":
            self._if_match(r, row)
            row = self.b.modify_line(company, row, self._body(r))
            return self._single(r, company, "salesInvoiceLines", row, url)
        if r.method == "DELETE":
            self._if_match(r, row)
            self.b.delete_line(company, row)
            return ApiResponse(204)
        raise BcError(405, "BadRequest_MethodNotAllowed",
                      f"'{r.method}' requests for 'salesInvoiceLines' are not allowed within Dynamics 365 "
                      "Business Central OData web services.")

    @staticmethod
    def _body(r: ApiRequest) -> Any:
        if r.body is _NO_BODY or r.body is _BAD_BODY:
            raise BcError(400, "BadRequest", "Invalid Request Body")
        return r.body

    @staticmethod
    def _if_match(r: ApiRequest, row: Row) -> None:
        header = r.headers.get("if-match", "").strip()
        if not header:
            raise _invalid_token()
        if not _etag_matches(header, row.version):
            raise BcError(409, "Request_EntityChanged", "Another user has already changed the record.")

    # shaping answers

    @staticmethod
    def _select_expand(r: ApiRequest, spec: EntitySpec) -> tuple[list[str] | None, bool]:
        select = odata.parse_select(r.query["$select"], spec.odata) if "$select" in r.query else None
        expand = False
        if r.query.get("$expand"):
            for name in (part.strip() for part in r.query["$expand"].split(",")):
                if spec is INVOICE and name == "salesInvoiceLines":
                    expand = True
                else:
                    raise odata.ODataError(f"Could not find a property named '{name}' on type "
                                           f"'Microsoft.NAV.{spec.type_name}'.")
        return select or None, expand

    def _single(self, r: ApiRequest, company: Company | None, set_name: str, row: Row, url: str,
                status: int = 200) -> ApiResponse:
        spec = _SPECS.get(set_name, COMPANY)
        select, expand = self._select_expand(r, spec)
        context_path = url.rsplit("(", 1)[0]
        body = {"@odata.context": f"{r.service_root}/$metadata#{context_path}/$entity"}
        body.update(self.b.present(company, set_name, row, select, expand))
        headers = {"ETag": etag(row.version)}
        if status == 201:
            headers["Location"] = f"{r.service_root}/{url}"
        return ApiResponse(status, body, headers)

    def _collection(self, r: ApiRequest, company: Company | None, spec: EntitySpec, rows: list[Row], base: str,
                    default_order: str = "number") -> ApiResponse:
        entity = spec.odata
        select, expand = self._select_expand(r, spec)
        if r.query.get("$filter"):
            predicate = odata.compile_filter(r.query["$filter"], entity)
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
        page = window[start:start + self.b.page_size]
        body: dict[str, Any] = {"@odata.context": f"{r.service_root}/$metadata#{base}"}
        if r.query.get("$count", "").lower() == "true":
            body["@odata.count"] = len(rows)
        body["value"] = [self.b.present(company, spec.set_name, row, select, expand) for row in page]
        if start + self.b.page_size < len(window):
            query = {k: v for k, v in r.query.items() if k != "$skiptoken"}
            query["$skiptoken"] = base64.urlsafe_b64encode(f"offset:{start + self.b.page_size}".encode()).decode()
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


# --- HTTP -------------------------------------------------------------------------------------

def _environment_key(path: str) -> str:
    """The FaultPlan's concurrency key: ``/{tenant}/{environment}`` (the limits are per environment)."""
    parts = path.split("/")
    if "api" in parts:
        return "/" + "/".join(parts[2:parts.index("api")]).lower()
    return path


_MIDDLEWARE_CODES = {"TooManyRequests": "Application_TooManyRequests", "InternalServerError": "Internal_ServerError"}


def _bc_error_body(status: int, code: str, message: str) -> dict:
    return {"error": {"code": _MIDDLEWARE_CODES.get(code, code), "message": message}}


def _json_response(response: ApiResponse) -> Response:
    headers = {"OData-Version": "4.0", **response.headers}
    if response.body is None:
        return Response(status_code=response.status, headers=headers)
    content = json.dumps(response.body, ensure_ascii=False).encode()
    return Response(content, status_code=response.status, headers=headers, media_type=_JSON_TYPE)


def _parse_json(raw: bytes | str | None) -> Any:
    if raw is None or (isinstance(raw, (bytes, str)) and not raw.strip()):
        return _NO_BODY
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError):
        return _BAD_BODY


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class BcSimulator:
    """Business Central API v2.0 for the tests, the demo and the benchmark.

    `app` is the ASGI application (serve it with `sandbox.server.ServerThread`; the app then uses
    ``BC_BASE_URL={server.url}/v2.0``). `plan` carries the latency, limits and faults; by default BC's
    5 concurrent requests per environment with 100 more waiting. `creates` counts records created
    through the API (``customers``, ``items``, ``salesInvoices``, ``salesInvoiceLines``), rolled-back
    ones excluded. Each inner request of a ``$batch`` costs `batch_item_ms` on top of the batch's
    own latency. Lists longer than `page_size` are paged with ``@odata.nextLink``."""

    def __init__(self, plan: FaultPlan | None = None, batch_item_ms: float = 0.0,
                 page_size: int = DEFAULT_PAGE_SIZE):
        self.plan = plan or FaultPlan(Knobs(max_concurrency=5, max_queued=100))
        self.batch_item_ms = batch_item_ms
        self._lock = threading.Lock()
        self._backend = _Backend(page_size)
        self._api = _Api(self._backend)
        prefixes = ("/v2.0/{tenant}/{environment}/api/v2.0", "/v2.0/{environment}/api/v2.0")
        methods = ["GET", "POST", "PATCH", "DELETE", "PUT"]
        routes = [Route(p + "/$batch", self._batch, methods=methods) for p in prefixes]
        routes += [Route(p + "/{path:path}", self._endpoint, methods=methods) for p in prefixes]
        routes.append(Route("/{path:path}", self._not_found, methods=methods))
        self.app = FaultMiddleware(Starlette(routes=routes), self.plan, key_of=_environment_key,
                                   error_body=_bc_error_body)

    @property
    def creates(self) -> Counter:
        return self._backend.creates

    @property
    def page_size(self) -> int:
        return self._backend.page_size

    @page_size.setter
    def page_size(self, value: int) -> None:
        with self._lock:
            self._backend.page_size = value

    # data API (tests, demo, benchmark)

    def add_company(self, tenant: str, environment: str, company_id: str | None = None,
                    name: str | None = None) -> str:
        """Create a company in an environment (creating the environment); returns its id."""
        with self._lock:
            return self._backend.add_company(tenant, environment, company_id, name)

    def customers(self, company_id: str) -> list[dict]:
        return self._list(company_id, "customers")

    def items(self, company_id: str) -> list[dict]:
        return self._list(company_id, "items")

    def invoices(self, company_id: str) -> list[dict]:
        """Every sales invoice (drafts and posted), each with its ``salesInvoiceLines``."""
        return self._list(company_id, "salesInvoices")

    def add_customer(self, company_id: str, **fields: Any) -> dict:
        """A customer created in BC by a user (no API template, not counted in `creates`)."""
        return self._create(company_id, "customers", fields)

    def add_item(self, company_id: str, **fields: Any) -> dict:
        """An item created in BC by a user (no API template, not counted in `creates`)."""
        return self._create(company_id, "items", fields)

    def update(self, company_id: str, entity: str, record_id: str, **fields: Any) -> dict:
        """A user editing a customer, item, draft invoice or line in BC (the record gets a new ETag)."""
        set_name = _entity_set(entity, allowed=tuple(_SPECS))
        with self._lock, self._backend.atomic(count=False):
            b = self._backend
            company = b.company(company_id)
            row = b.row(company, set_name, record_id.lower())
            if set_name == "salesInvoices":
                row = b.modify_invoice(company, row, fields)
            elif set_name == "salesInvoiceLines":
                row = b.modify_line(company, row, fields)
            else:
                row = b.modify_master(company, _SPECS[set_name], row, fields)
            return b.present(company, set_name, row, expand=set_name == "salesInvoices")

    def delete_invoice(self, company_id: str, invoice_id: str) -> None:
        """A user deleting a draft invoice in BC."""
        with self._lock, self._backend.atomic(count=False):
            company = self._backend.company(company_id)
            self._backend.delete_invoice(company, invoice_id.lower())

    def post_invoice(self, company_id: str, invoice_id: str) -> dict:
        """A user posting a draft: status ``Open``, a posted number (``PS-INV103001``…), same id."""
        with self._lock, self._backend.atomic(count=False):
            company = self._backend.company(company_id)
            row = self._backend.post_invoice(company, invoice_id.lower())
            return self._backend.present(company, "salesInvoices", row, expand=True)

    def set_api_template(self, entity: str, **defaults: Any) -> None:
        """BC's "API Setup" template for ``customers`` or ``items``: values for the fields a create
        request leaves out. Replaces the previous template of that entity (no arguments: none)."""
        set_name = _entity_set(entity, allowed=("customers", "items"))
        spec = _SPECS[set_name]
        for name in ("id", "number", "displayName"):
            if name in defaults:
                raise ValueError(f"an API template cannot set {name!r}")
        values = coerce_body(spec, defaults)
        with self._lock:
            self._backend.templates[set_name] = values

    def _list(self, company_id: str, set_name: str) -> list[dict]:
        with self._lock:
            b = self._backend
            company = b.company(company_id)
            rows = sorted(company.tables[set_name].values(), key=lambda row: row.fields["number"])
            return [b.present(company, set_name, row, expand=set_name == "salesInvoices") for row in rows]

    def _create(self, company_id: str, set_name: str, fields: dict[str, Any]) -> dict:
        with self._lock, self._backend.atomic(count=False):
            b = self._backend
            company = b.company(company_id)
            row = b.create_master(company, _SPECS[set_name], fields, api=False)
            return b.present(company, set_name, row)

    # HTTP

    @staticmethod
    def _claims(request: Request) -> dict | Response:
        try:
            claims = verify(request.headers.get("authorization"), BC_AUDIENCE)
        except InvalidToken as error:
            body = {"error": {"code": "Authentication_InvalidCredentials",
                              "message": f"The server has rejected the client credentials. {error}"}}
            return Response(json.dumps(body), status_code=401, media_type="application/json",
                            headers={"WWW-Authenticate": 'Bearer realm="", error="invalid_token"'})
        tenant = request.path_params.get("tenant")
        tid = str(claims.get("tid", ""))
        if tenant and odata.is_guid(tenant) and odata.is_guid(tid) and tenant.lower() != tid.lower():
            body = {"error": {"code": "Authentication_InvalidCredentials",
                              "message": "The server has rejected the client credentials: the token was issued "
                                         "for another tenant."}}
            return Response(json.dumps(body), status_code=401, media_type="application/json")
        return claims

    def _context(self, request: Request, claims: dict) -> tuple[str, str, str] | Response:
        tenant = request.path_params.get("tenant") or str(claims.get("tid", ""))
        environment = request.path_params["environment"]
        with self._lock:
            known = (tenant.lower(), environment.lower()) in self._backend.environments
        if not known:
            return _json_response(ApiResponse(404, {"error": {
                "code": "EnvironmentNotFound",
                "message": f"Environment '{environment}' does not exist for tenant '{tenant}'."}}))
        prefix = f"/v2.0/{request.path_params['tenant']}/{environment}" if "tenant" in request.path_params \
            else f"/v2.0/{environment}"
        root = str(request.base_url).rstrip("/") + prefix + "/api/v2.0"
        return tenant, environment, root

    def _authorised(self, request: Request) -> tuple[str, str, str] | Response:
        """(tenant, environment, API root) of a request with a valid token, or the error answer."""
        claims = self._claims(request)
        if isinstance(claims, Response):
            return claims
        return self._context(request, claims)

    async def _endpoint(self, request: Request) -> Response:
        context = self._authorised(request)
        if isinstance(context, Response):
            return context
        tenant, environment, root = context
        if request.method == "PUT":
            return _json_response(_error_response(BcError(
                405, "BadRequest_MethodNotAllowed",
                "'PUT' requests are not allowed within Dynamics 365 Business Central OData web services; use PATCH.")))
        body = _parse_json(await request.body()) if request.method in ("POST", "PATCH") else _NO_BODY
        api_request = ApiRequest(request.method, tenant, environment, request.path_params["path"],
                                 dict(request.query_params), {k.lower(): v for k, v in request.headers.items()},
                                 body, root)
        with self._lock:
            response = self._api.handle(api_request)
        return _json_response(response)

    async def _batch(self, request: Request) -> Response:
        context = self._authorised(request)
        if isinstance(context, Response):
            return context
        tenant, environment, root = context
        if request.method != "POST":
            return _json_response(_error_response(BcError(
                405, "BadRequest_MethodNotAllowed", f"'{request.method}' requests for '$batch' are not allowed.")))
        try:
            inner = _batch_requests(_parse_json(await request.body()), tenant, environment, root)
        except BcError as error:
            return _json_response(_error_response(error))
        if self.batch_item_ms:
            await asyncio.sleep(len(inner) * self.batch_item_ms / 1000)
        snapshot = request.headers.get("isolation", "").strip().lower() == "snapshot"
        continue_on_error = "odata.continue-on-error" in request.headers.get("prefer", "").lower()
        with self._lock:
            results = self._run_batch(inner, snapshot, continue_on_error)
        responses = []
        for request_id, response in results:
            entry: dict[str, Any] = {"id": request_id, "status": response.status,
                                     "headers": _inner_headers(response)}
            if response.body is not None:
                entry["body"] = response.body
            responses.append(entry)
        return _json_response(ApiResponse(200, {"responses": responses}))

    def _run_batch(self, inner: list[tuple[Any, list, ApiRequest]], snapshot: bool,
                   continue_on_error: bool) -> list[tuple[Any, ApiResponse]]:
        """Run in order; stop at the first failure (unless continue-on-error). A snapshot batch runs
        as one transaction: a failure undoes it all, earlier answers stay as they were."""
        results: list[tuple[Any, ApiResponse]] = []
        failed: set = set()

        def run() -> None:
            for request_id, depends_on, api_request in inner:
                if any(dependency in failed for dependency in depends_on):
                    response = _error_response(BcError(424, "BadRequest_FailedDependency",
                                                       "A request this request depends on failed."))
                else:
                    response = self._api.handle(api_request)
                results.append((request_id, response))
                if response.status >= 400:
                    failed.add(request_id)
                    if snapshot:
                        raise _Rollback
                    if not continue_on_error:
                        return

        if snapshot:
            try:
                with self._backend.atomic():
                    run()
            except _Rollback:
                pass
        else:
            run()
        return results

    async def _not_found(self, request: Request) -> Response:
        return _json_response(ApiResponse(404, {"error": {
            "code": "BadRequest_NotFound",
            "message": f"No HTTP resource was found that matches the request URI '{request.url}'."}}))


def _entity_set(entity: str, allowed: tuple[str, ...]) -> str:
    names = {"customer": "customers", "item": "items", "salesInvoice": "salesInvoices",
             "salesInvoiceLine": "salesInvoiceLines"}
    set_name = names.get(entity, entity)
    if set_name not in allowed:
        raise ValueError(f"entity must be one of {', '.join(allowed)}, not {entity!r}")
    return set_name


def _inner_headers(response: ApiResponse) -> dict[str, str]:
    headers = {k.lower(): v for k, v in response.headers.items()}
    if response.body is not None:
        headers.update({"content-type": _INNER_JSON_TYPE, "odata-version": "4.0"})
    return headers


def _batch_requests(body: Any, tenant: str, environment: str, root: str) -> list[tuple[Any, list, ApiRequest]]:
    """The inner requests of a JSON ``$batch`` body, or the 400 BC gives for a bad envelope."""
    if not isinstance(body, dict) or not isinstance(body.get("requests"), list):
        raise BcError(400, "BadRequest", "Invalid Request Body: a JSON batch needs a 'requests' array.")
    requests = body["requests"]
    if len(requests) > MAX_BATCH_REQUESTS:
        raise BcError(400, "BadRequest", f"The batch contains {len(requests)} operations; the maximum number of "
                                         f"'{MAX_BATCH_REQUESTS}' operations per $batch request was exceeded.")
    result = []
    for number, item in enumerate(requests):
        if not (isinstance(item, dict) and isinstance(item.get("url"), str) and isinstance(item.get("method"), str)):
            raise BcError(400, "BadRequest", f"Invalid Request Body: request {number} needs 'method' and 'url'.")
        method = item["method"].upper()
        if method not in ("GET", "POST", "PATCH", "DELETE"):
            raise BcError(400, "BadRequest", f"Invalid Request Body: method '{item['method']}' is not supported.")
        url = item["url"]
        split = urlsplit(url)
        path = split.path
        if "/api/v2.0/" in path:
            path = path.split("/api/v2.0/", 1)[1]
        path = unquote(path.lstrip("/"))
        if path.startswith("$batch"):
            raise BcError(400, "BadRequest", "Invalid Request Body: a batch cannot contain a batch.")
        headers = item.get("headers") or {}
        if not isinstance(headers, dict):
            raise BcError(400, "BadRequest", f"Invalid Request Body: request {number} has invalid 'headers'.")
        raw_body = item.get("body", _NO_BODY)
        if isinstance(raw_body, str):
            raw_body = _parse_json(raw_body)
        elif raw_body is None:
            raw_body = _NO_BODY
        depends_on = item.get("dependsOn") or []
        query = dict(parse_qsl(split.query, keep_blank_values=True))
        api_request = ApiRequest(method, tenant, environment, path, query,
                                 {str(k).lower(): str(v) for k, v in headers.items()}, raw_body, root)
        result.append((item.get("id"), list(depends_on) if isinstance(depends_on, list) else [], api_request))
    return result
