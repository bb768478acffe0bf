"""The setup records a customer's or an item's codes refer to, and the VAT Posting Setup, as a
CRONUS company has them, with the checks BC makes when a record names one.

A customer names a currency, payment terms, a shipment and a payment method (by id), a
salesperson and its posting groups; an item its category, tax group, base unit of measure and
posting groups. BC's API pages refuse an id or code they cannot match with their own messages
(APIV2Customers/APIV2Items: 'The "currencyCode" does not match to a Currency.'); the other fields
are table relations (`Internal_InvalidTableRelation`). A sales line looks up the VAT Posting
Setup of its header's VAT Bus. Posting Group (from the bill-to customer) and its item's VAT Prod.
Posting Group, and is refused when there is none. The lists are CRONUS-like, not documented;
`DataApi.add_setup_record`, `remove_setup_record` and `set_vat_posting_setup` change them.
"""

from __future__ import annotations

from typing import Any

from sandbox.bc.errors import BcError, dialog
from sandbox.bc.fields import CUSTOMER, ITEM, LCY_CODE, ZERO_GUID, EntitySpec, derived_id
from sandbox.bc.rules import table_relation

SETUP_TABLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "currencies": ("Currency", ("AUD", "CAD", "CHF", "DKK", "EUR", "GBP", "JPY", "NOK", "NZD", "SEK", "USD")),
    "paymentTerms": ("Payment Terms", ("10 DAYS", "14 DAYS", "1M(8D)", "21 DAYS", "2 DAYS", "30 DAYS", "60 DAYS",
                                       "7 DAYS", "CM", "COD", "LCOD")),
    "shipmentMethods": ("Shipment Method", ("CFR", "CIF", "CIP", "CPT", "DAF", "DDP", "DDU", "DELIVERY", "DEQ",
                                            "DES", "EXW", "FAS", "FCA", "FOB", "PICKUP")),
    "paymentMethods": ("Payment Method", ("ACCOUNT", "BANK", "CARD", "CASH", "CHECK", "GIRO", "INTERCOM")),
    "salespeople": ("Salesperson/Purchaser", ("AH", "BC", "EH", "HR", "JO", "JR", "MH", "OF", "PS", "RB", "RL",
                                              "TD")),
    "unitsOfMeasure": ("Unit of Measure", ("BOX", "CAN", "DAY", "HOUR", "KG", "KM", "L", "PACK", "PALLET", "PCS",
                                           "SET", "WEEK")),
    "itemCategories": ("Item Category", ("CHAIR", "DESK", "FURNITURE", "MISC", "OFFICE", "SERVICES", "SUPPLIERS",
                                         "TABLE")),
    "taxGroups": ("Tax Group", ("FURNITURE", "LABOR", "MATERIALS", "NONTAXABLE", "SUPPLIES", "TAXABLE")),
    "genProdPostingGroups": ("Gen. Product Posting Group", ("MANUFACT", "MISC", "RAW MAT", "RETAIL", "SERVICES")),
    "inventoryPostingGroups": ("Inventory Posting Group", ("FINISHED", "RAW MAT", "RESALE")),
    "customerPostingGroups": ("Customer Posting Group", ("DOMESTIC", "EU", "EXPORT", "FOREIGN")),
    "genBusPostingGroups": ("Gen. Business Posting Group", ("DOMESTIC", "EU", "EXPORT", "INTERCOMP")),
    "vatBusPostingGroups": ("VAT Business Posting Group", ("DOMESTIC", "EU", "EXPORT")),
    "vatProdPostingGroups": ("VAT Product Posting Group", ("FULL NORM", "FULL RED", "NO VAT", "REDUCED",
                                                           "SERV NORM", "SERV RED", "SERVICES", "STANDARD", "ZERO")),
}
"""Table name (the data API's) → (BC's table caption, the codes a new company has)."""

VAT_POSTING_SETUP = {(bus, prod) for bus in ("", *SETUP_TABLES["vatBusPostingGroups"][1])
                     for prod in ("", *SETUP_TABLES["vatProdPostingGroups"][1])}
"""A new company's VAT Posting Setup: every business group with every product group, and blank
ones (a sales-tax company's lines have neither)."""

_PAGE_CHECKS: dict[str, dict[str, tuple[str, str, str]]] = {
    CUSTOMER.set_name: {
        "currencyCode": ("currencies", "code", 'The "currencyCode" does not match to a Currency.'),
        "currencyId": ("currencies", "id", 'The "currencyId" does not match to a Currency.'),
        "paymentTermsId": ("paymentTerms", "id", 'The "paymentTermsId" does not match to a Payment Terms.'),
        "shipmentMethodId": ("shipmentMethods", "id", 'The "shipmentMethodId" does not match to a Shipment Method.'),
        "paymentMethodId": ("paymentMethods", "id", 'The "paymentMethodId" does not match to a Payment Method.'),
    },
    ITEM.set_name: {
        "itemCategoryCode": ("itemCategories", "code", 'The "itemCategoryCode" does not match to a Item Category.'),
        "itemCategoryId": ("itemCategories", "id",
                           'The "itemCategoryId" does not match to a specific Item Category group.'),
        "taxGroupCode": ("taxGroups", "code", 'The "taxGroupCode" does not match to a Tax Group.'),
        "taxGroupId": ("taxGroups", "id", 'The "taxGroupId" does not match to a Tax Group.'),
        "baseUnitOfMeasureId": ("unitsOfMeasure", "id", 'The "baseUnitOfMeasureId" does not match to a Unit of Measure.'),
    },
}
"""API page field → (setup table, matched by code or id, the page's error)."""

_RELATIONS: dict[str, dict[str, str]] = {
    CUSTOMER.set_name: {"salespersonCode": "salespeople", "customerPostingGroup": "customerPostingGroups",
                        "genBusPostingGroup": "genBusPostingGroups", "vatBusPostingGroup": "vatBusPostingGroups"},
    ITEM.set_name: {"generalProductPostingGroupCode": "genProdPostingGroups",
                    "inventoryPostingGroupCode": "inventoryPostingGroups", "vatProdPostingGroup": "vatProdPostingGroups"},
}
"""Table fields with a `TableRelation` to a setup table (BASEAPP Customer.Table.al, Item.Table.al)."""

ID_KINDS = {"currencies": "currencyCode", "paymentTerms": "paymentTerms", "shipmentMethods": "shipmentMethods",
            "paymentMethods": "paymentMethods", "itemCategories": "itemCategoryCode", "taxGroups": "taxGroupCode",
            "unitsOfMeasure": "baseUnitOfMeasureCode"}
"""How a setup record's id is derived (`fields.derived_id`), so that the ids BC fills in for a code
(`fields.CODE_IDS`) are the records' own."""


def new_setup() -> dict[str, set[str]]:
    return {table: set(codes) for table, (_, codes) in SETUP_TABLES.items()}


def setup_id(table: str, code: str) -> str:
    return derived_id(ID_KINDS[table], code)


def check_references(setup: dict[str, set[str]], spec: EntitySpec, values: dict[str, Any]) -> None:
    """What BC refuses of a customer's or item's references to setup records (a blank one, and
    the local currency, refer to nothing)."""
    for name, (table, by, message) in _PAGE_CHECKS.get(spec.set_name, {}).items():
        value = values.get(name)
        if not value or value == ZERO_GUID or (name == "currencyCode" and value == LCY_CODE):
            continue
        known = setup[table] if by == "code" else {setup_id(table, code) for code in setup[table]}
        if value not in known:
            raise dialog(message)
    if spec is ITEM and values.get("baseUnitOfMeasureCode") and \
            values["baseUnitOfMeasureCode"] not in setup["unitsOfMeasure"]:
        raise dialog(f"The Unit of Measure with Code {values['baseUnitOfMeasureCode']} does not exist.")
    for name, table in _RELATIONS.get(spec.set_name, {}).items():
        value = values.get(name)
        if value and value not in setup[table]:
            raise table_relation(spec.fields[name].caption, spec.table, value, SETUP_TABLES[table][0])


def check_vat_posting_setup(vat_setup: set[tuple[str, str]], business_group: str, product_group: str) -> None:
    """SalesLine "VAT Prod. Posting Group" OnValidate: `VATPostingSetup.Get(bus, prod)`."""
    if (business_group, product_group) not in vat_setup:
        raise BcError(404, "Internal_RecordNotFound",
                      "The VAT Posting Setup does not exist. Identification fields and values: "
                      f"VAT Bus. Posting Group='{business_group}',VAT Prod. Posting Group='{product_group}'")
