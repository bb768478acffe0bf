"""The entities' fields as the API v2.0 pages declare them, and how a JSON value becomes one.

Each `EntitySpec` lists an API page's fields with the type and length of the table field behind
it (``Text[100]``, ``Code[20]``, an enum, a GUID…) and whether the page makes it read-only. A
POST/PATCH body is checked against that list exactly as BC's OData layer checks it: unknown and
read-only properties, JSON types, lengths and enum options are refused with BC's own codes and
wording, before any business rule runs.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import uuid
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from sandbox.bc import odata
from sandbox.bc.errors import BcError
from sandbox.text import utf16_length

LCY_CODE = "USD"
ZERO_GUID = "00000000-0000-0000-0000-000000000000"
_ID_NAMESPACE = uuid.UUID("5b0f7c3e-7d4a-4b8e-9a57-0c2f1f7d9a10")


@dataclass(frozen=True)
class Field:
    kind: str
    """``text``, ``code`` (upper-cased and trimmed, like AL ``Code[n]``), ``guid``, ``decimal``,
    ``int``, ``bool``, ``date``, ``datetime`` or ``enum``."""
    max_length: int | None = None
    read_only: bool = False
    options: tuple[str, ...] = ()
    caption: str = ""
    """The table field's caption, as BC's messages name it (``E-Mail`` is captioned ``Email``)."""
    hidden: bool = False
    """A table field the API page does not publish (posting groups of a customer): never in an
    answer, refused in a request body, but set by API Setup templates and by BC users."""
    relation: str = ""
    """The entity set of the table this field's ``TableRelation`` points to (``countriesRegions``)."""

    @property
    def blank(self) -> Any:
        return {"text": "", "code": "", "guid": ZERO_GUID, "decimal": Decimal(0), "int": 0, "bool": False,
                "date": "0001-01-01", "datetime": "0001-01-01T00:00:00Z"}.get(
                    self.kind, self.options[0] if self.options else "")


def _text(length: int, caption: str = "") -> Field:
    return Field("text", length, caption=caption)


def _code(length: int, caption: str = "", relation: str = "") -> Field:
    return Field("code", length, caption=caption, relation=relation)


def _ro_text(length: int, caption: str = "") -> Field:
    return Field("text", length, read_only=True, caption=caption)


def _ro_code(length: int, caption: str = "") -> Field:
    return Field("code", length, read_only=True, caption=caption)


def _hidden_code(length: int, caption: str) -> Field:
    return Field("code", length, caption=caption, hidden=True)


def _enum(*options: str) -> Field:
    return Field("enum", options=options)


GUID_F, DEC, INT, BOOL, DATE = Field("guid"), Field("decimal"), Field("int"), Field("bool"), Field("date")
RO_GUID, RO_DEC = Field("guid", read_only=True), Field("decimal", read_only=True)
RO_TEXT, RO_DATETIME = Field("text", read_only=True), Field("datetime", read_only=True)

_ODATA_KIND = {"text": odata.STRING, "code": odata.CODE, "enum": odata.STRING, "guid": odata.GUID,
               "decimal": odata.NUMBER, "int": odata.NUMBER, "bool": odata.BOOL, "date": odata.DATE,
               "datetime": odata.DATETIME}


@dataclass(frozen=True)
class EntitySpec:
    set_name: str
    type_name: str
    table: str
    """The BC table, as BC names it in "does not exist" messages."""
    fields: dict[str, Field]
    source_table: str = ""
    """The API page's source table, as BC names it in field validation messages (default `table`)."""

    @property
    def message_table(self) -> str:
        return self.source_table or self.table

    @property
    def odata(self) -> odata.EntityType:
        public = {name: f for name, f in self.fields.items() if not f.hidden}
        return odata.EntityType(
            self.type_name, {name: _ODATA_KIND[f.kind] for name, f in public.items()},
            lengths={name: f.max_length for name, f in public.items() if f.max_length is not None},
            captions={name: f.caption for name, f in public.items() if f.caption},
            table=self.message_table)

    def public(self) -> list[str]:
        """The fields an answer shows, in the page's order."""
        return [name for name, f in self.fields.items() if not f.hidden]


COMPANY = EntitySpec("companies", "company", "Company", {
    "id": RO_GUID, "systemVersion": RO_TEXT, "timestamp": Field("int", read_only=True), "name": RO_TEXT,
    "displayName": RO_TEXT, "businessProfileId": RO_TEXT, "systemCreatedAt": RO_DATETIME,
    "systemCreatedBy": RO_GUID, "systemModifiedAt": RO_DATETIME, "systemModifiedBy": RO_GUID,
})

# Types and lengths: the W1 tables behind the APIV2 pages (Customer, Item, Sales Invoice Entity
# Aggregate, Sales Invoice Line Aggregate, Country/Region) in microsoft/BCApps.
CUSTOMER = EntitySpec("customers", "customer", "Customer", {
    "id": RO_GUID, "number": _code(20, "No."), "displayName": _text(100, "Name"),
    "type": _enum("Company", "Person"), "addressLine1": _text(100, "Address"),
    "addressLine2": _text(50, "Address 2"), "city": _text(30, "City"), "state": _text(30, "County"),
    "country": _code(10, "Country/Region Code", relation="countriesRegions"), "postalCode": _code(20, "Post Code"),
    "phoneNumber": _text(30, "Phone No."), "email": _text(80, "Email"), "website": _text(255, "Home Page"),
    "salespersonCode": _code(20, "Salesperson Code"), "balanceDue": RO_DEC, "creditLimit": DEC,
    "taxLiable": BOOL, "taxAreaId": GUID_F, "taxAreaDisplayName": RO_TEXT,
    "taxRegistrationNumber": _text(20, "VAT Registration No."), "currencyId": GUID_F,
    "currencyCode": _code(10, "Currency Code"), "paymentTermsId": GUID_F, "shipmentMethodId": GUID_F,
    "paymentMethodId": GUID_F, "blocked": _enum("_x0020_", "Ship", "Invoice", "All"),
    "lastModifiedDateTime": RO_DATETIME,
    "customerPostingGroup": _hidden_code(20, "Customer Posting Group"),
    "genBusPostingGroup": _hidden_code(20, "Gen. Bus. Posting Group"),
    "vatBusPostingGroup": _hidden_code(20, "VAT Bus. Posting Group"),
    "locationCode": _hidden_code(10, "Location Code"),
})

ITEM = EntitySpec("items", "item", "Item", {
    "id": RO_GUID, "number": _code(20, "No."), "displayName": _text(100, "Description"),
    "displayName2": _text(50, "Description 2"), "type": _enum("Inventory", "Service", "Non_x002D_Inventory"),
    "itemCategoryId": GUID_F, "itemCategoryCode": _code(20, "Item Category Code"), "blocked": BOOL,
    "gtin": _code(14, "GTIN"), "inventory": DEC, "unitPrice": DEC, "priceIncludesTax": BOOL, "unitCost": DEC,
    "taxGroupId": GUID_F, "taxGroupCode": _code(20, "Tax Group Code"), "baseUnitOfMeasureId": GUID_F,
    "baseUnitOfMeasureCode": _code(10, "Base Unit of Measure"), "generalProductPostingGroupId": GUID_F,
    "generalProductPostingGroupCode": _code(20, "Gen. Prod. Posting Group"), "inventoryPostingGroupId": GUID_F,
    "inventoryPostingGroupCode": _code(20, "Inventory Posting Group"), "lastModifiedDateTime": RO_DATETIME,
    "vatProdPostingGroup": _hidden_code(20, "VAT Prod. Posting Group"),
    "salesBlocked": Field("bool", caption="Sales Blocked", hidden=True),
})

INVOICE_STATUSES = ("Draft", "In_x0020_Review", "Open", "Paid", "Canceled", "Corrective")

INVOICE = EntitySpec("salesInvoices", "salesInvoice", "Sales Header", {
    "id": RO_GUID, "number": _ro_code(20, "No."), "externalDocumentNumber": _code(35, "External Document No."),
    "invoiceDate": DATE, "postingDate": DATE, "dueDate": DATE, "promisedPayDate": DATE,
    "customerPurchaseOrderReference": _text(35, "Your Reference"), "customerId": GUID_F,
    "customerNumber": _code(20, "Sell-to Customer No."), "customerName": _ro_text(100, "Sell-to Customer Name"),
    "billToName": _ro_text(100, "Bill-to Name"), "billToCustomerId": GUID_F,
    "billToCustomerNumber": _code(20, "Bill-to Customer No."), "shipToName": _text(100, "Ship-to Name"),
    "shipToContact": _text(100, "Ship-to Contact"), "sellToAddressLine1": _text(100, "Sell-to Address"),
    "sellToAddressLine2": _text(50, "Sell-to Address 2"), "sellToCity": _text(30, "Sell-to City"),
    "sellToCountry": _code(10, "Sell-to Country/Region Code", relation="countriesRegions"),
    "sellToState": _text(30, "Sell-to County"), "sellToPostCode": _code(20, "Sell-to Post Code"),
    "billToAddressLine1": _ro_text(100, "Bill-to Address"), "billToAddressLine2": _ro_text(50, "Bill-to Address 2"),
    "billToCity": _ro_text(30, "Bill-to City"), "billToCountry": _ro_code(10, "Bill-to Country/Region Code"),
    "billToState": _ro_text(30, "Bill-to County"), "billToPostCode": _ro_code(20, "Bill-to Post Code"),
    "shipToAddressLine1": _text(100, "Ship-to Address"), "shipToAddressLine2": _text(50, "Ship-to Address 2"),
    "shipToCity": _text(30, "Ship-to City"),
    "shipToCountry": _code(10, "Ship-to Country/Region Code", relation="countriesRegions"),
    "shipToState": _text(30, "Ship-to County"), "shipToPostCode": _code(20, "Ship-to Post Code"),
    "currencyId": GUID_F, "shortcutDimension1Code": _code(20, "Shortcut Dimension 1 Code"),
    "shortcutDimension2Code": _code(20, "Shortcut Dimension 2 Code"), "currencyCode": _code(10, "Currency Code"),
    "orderId": RO_GUID, "orderNumber": _ro_code(20, "Order No."), "paymentTermsId": GUID_F,
    "shipmentMethodId": GUID_F, "salesperson": _code(20, "Salesperson Code"), "disputeStatusId": GUID_F,
    "disputeStatus": _code(10, "Dispute Status"), "pricesIncludeTax": Field("bool", read_only=True),
    "remainingAmount": RO_DEC, "discountAmount": DEC, "discountAppliedBeforeTax": Field("bool", read_only=True),
    "totalAmountExcludingTax": RO_DEC, "totalTaxAmount": RO_DEC, "totalAmountIncludingTax": RO_DEC,
    "status": Field("enum", read_only=True, options=INVOICE_STATUSES), "lastModifiedDateTime": RO_DATETIME,
    "phoneNumber": _text(30, "Sell-to Phone No."), "email": _text(80, "Email"),
    "locationCode": _hidden_code(10, "Location Code"),
    "vatBusPostingGroup": _hidden_code(20, "VAT Bus. Posting Group"),
    "posted": Field("bool", caption="Posted", hidden=True),
    "released": Field("bool", caption="Released", hidden=True),
}, source_table="Sales Invoice Entity Aggregate")

LINE = EntitySpec("salesInvoiceLines", "salesInvoiceLine", "Sales Line", {
    "id": RO_GUID, "documentId": GUID_F, "sequence": INT, "itemId": GUID_F, "accountId": GUID_F,
    "lineType": _enum("Comment", "Account", "Item", "Resource", "Fixed_x0020_Asset", "Charge",
                      "Allocation_x0020_Account"),
    "lineObjectNumber": _code(20, "No."), "description": _text(100, "Description"),
    "description2": _text(50, "Description 2"), "unitOfMeasureId": GUID_F,
    "unitOfMeasureCode": _code(10, "Unit of Measure Code"), "unitPrice": DEC, "quantity": DEC,
    "discountAmount": DEC, "discountPercent": DEC, "discountAppliedBeforeTax": Field("bool", read_only=True),
    "amountExcludingTax": RO_DEC, "taxCode": _code(50, "Tax Code"), "taxPercent": RO_DEC, "totalTaxAmount": RO_DEC,
    "amountIncludingTax": RO_DEC, "invoiceDiscountAllocation": RO_DEC, "netAmount": RO_DEC,
    "netTaxAmount": RO_DEC, "netAmountIncludingTax": RO_DEC, "shipmentDate": DATE, "itemVariantId": GUID_F,
    "locationId": GUID_F,
}, source_table="Sales Invoice Line Aggregate")

ADDRESS_FORMATS = ("Post_x0020_Code_x002B_City", "City_x002B_Post_x0020_Code",
                   "City_x002B_County_x002B_Post_x0020_Code", "Blank_x0020_Line_x002B_Post_x0020_Code_x002B_City",
                   "Custom")
"""Enum "Country/Region Address Format" as OData names its values."""

COUNTRY = EntitySpec("countriesRegions", "countryRegion", "Country/Region", {
    "id": RO_GUID, "code": _code(10, "Code"), "displayName": _text(50, "Name"),
    "addressFormat": Field("enum", options=ADDRESS_FORMATS), "lastModifiedDateTime": RO_DATETIME,
})

# APIV2Dimensions.Page.al and APIV2DimensionValuesEntity.Page.al: read-only pages (InsertAllowed,
# ModifyAllowed and DeleteAllowed false) over the Dimension and Dimension Value tables. `blocked`
# is a table field neither page publishes: only a BC user sets it.
DIMENSION = EntitySpec("dimensions", "dimension", "Dimension", {
    "id": RO_GUID, "code": _ro_code(20, "Code"), "displayName": _ro_text(30, "Name"),
    "consolidationCode": _ro_code(20, "Consolidation Code"), "lastModifiedDateTime": RO_DATETIME,
    "blocked": Field("bool", hidden=True),
})

DIMENSION_VALUE = EntitySpec("dimensionValues", "dimensionValue", "Dimension Value", {
    "id": RO_GUID, "code": _ro_code(20, "Code"), "dimensionId": RO_GUID, "displayName": _ro_text(50, "Name"),
    "consolidationCode": _ro_code(20, "Consolidation Code"), "lastModifiedDateTime": RO_DATETIME,
    "dimensionCode": Field("code", 20, caption="Dimension Code", hidden=True),
    "blocked": Field("bool", hidden=True),
})

# APIV2DimensionSetLines.Page.al over the temporary "Dimension Set Entry Buffer" (key: Parent Id,
# Dimension Id): `id` is the dimension's id; parent and consolidation fields are Editable = false.
DIMENSION_SET_LINE = EntitySpec("dimensionSetLines", "dimensionSetLine", "Dimension Set Entry Buffer", {
    "id": GUID_F, "code": _code(20, "Dimension Code"), "consolidationCode": _ro_code(20, "Consolidation Code"),
    "parentId": RO_GUID, "parentType": Field("enum", read_only=True, options=("Sales_x0020_Invoice",
                                                                             "Sales_x0020_Invoice_x0020_Line")),
    "displayName": _text(30, "Display Name"),
    "valueId": GUID_F, "valueCode": _code(20, "Value Code"),
    "valueConsolidationCode": _ro_code(20, "Dimension Value Consolidation Code"),
    "valueDisplayName": _text(50, "Value Display Name"),
})

SPECS = {spec.set_name: spec for spec in (CUSTOMER, ITEM, INVOICE, LINE, COUNTRY, DIMENSION, DIMENSION_VALUE)}

CODE_IDS = {
    "customers": {"currencyCode": "currencyId"},
    "items": {"itemCategoryCode": "itemCategoryId", "taxGroupCode": "taxGroupId",
              "baseUnitOfMeasureCode": "baseUnitOfMeasureId",
              "generalProductPostingGroupCode": "generalProductPostingGroupId",
              "inventoryPostingGroupCode": "inventoryPostingGroupId"},
}
"""Code fields whose setup record id BC fills in too (the simulator derives a stable id)."""


def option_label(option: str) -> str:
    return re.sub(r"_x([0-9A-Fa-f]{4})_", lambda m: chr(int(m.group(1), 16)), option)


def coerce_value(spec: EntitySpec, name: str, f: Field, value: Any) -> Any:
    """A JSON value converted to the field's type, or the error BC gives for it."""
    if value is None:
        return f.blank
    if f.kind in ("text", "code"):
        if not isinstance(value, str):
            raise BcError(400, "BadRequest", f"Cannot convert a primitive value to the expected type 'Edm.String' "
                                             f"(property '{name}').")
        if f.max_length is not None and utf16_length(value) > f.max_length:
            raise BcError(400, "Application_StringExceededLength",
                          f"The length of the string is {utf16_length(value)}, but it must be less than or equal "
                          f"to {f.max_length} characters. Value: {value}")
        return value.strip().upper() if f.kind == "code" else value
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
            labels = ",".join(option_label(o).strip() or " " for o in f.options)
            raise BcError(400, "Unknown", f"'{value}' is not an option. The existing options are: {labels}")
        return value
    raise BcError(400, "BadRequest", f"The property '{name}' cannot be set.")


def coerce_body(spec: EntitySpec, body: Any, navigation: tuple[str, ...] = (), *,
                hidden: bool = False, writable: bool = False) -> dict[str, Any]:
    """Check a POST/PATCH body against the entity: unknown and read-only fields, types, lengths.
    `hidden`: the body may set the fields the page does not publish (templates, BC users);
    `writable`: a BC user sets fields the read-only API page shows (dimensions, their values)."""
    if not isinstance(body, dict):
        raise BcError(400, "BadRequest", "Invalid Request Body")
    values: dict[str, Any] = {}
    for name, value in body.items():
        if name.startswith("@odata.") or name in navigation:
            continue
        f = spec.fields.get(name)
        if f is None or (f.hidden and not hidden):
            raise BcError(400, "BadRequest",
                          f"The property '{name}' does not exist on type 'Microsoft.NAV.{spec.type_name}'. "
                          "Make sure to only use property names that are defined by the type.")
        if f.read_only and not writable:
            raise BcError(400, "BadRequest_InvalidOperation", f"Control '{name}' is read-only.")
        values[name] = coerce_value(spec, name, f, value)
    return values


def json_value(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def money(value: Decimal) -> Decimal:
    return value.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def derived_id(kind: str, code: str) -> str:
    """A stable id for a setup record known only by its code (unit of measure, tax group…)."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"{kind}:{code}")) if code else ZERO_GUID


def spec_of(set_name: str) -> EntitySpec:
    """The entity of an entity set the API answers with (``companies`` for the company itself)."""
    if set_name == DIMENSION_SET_LINE.set_name:
        return DIMENSION_SET_LINE
    return SPECS.get(set_name, COMPANY)
