"""Customers and items: the master records an invoice refers to.

Both are keyed by a number from a number series (or one given by hand), need a display name, and
get BC's "API Setup" template for what a create request left out. A customer's phone number,
e-mail address and country are validated as the Customer table validates them. Posting groups
are table fields the API does not publish: only the API Setup template (or a BC user) sets them.
They cannot be deleted while a draft invoice uses them, as BC's table triggers refuse it.
"""

from __future__ import annotations

import uuid
from typing import Any

from sandbox.bc.errors import dialog
from sandbox.bc.fields import CODE_IDS, CUSTOMER, ITEM, LCY_CODE, ZERO_GUID, EntitySpec, coerce_body, derived_id
from sandbox.bc.rules import check_customer_phone, check_email_addresses
from sandbox.bc.setup import check_references
from sandbox.bc.store import MISSING, Company, Row, Store


def user_defaults(spec: EntitySpec, values: dict[str, Any]) -> dict[str, Any]:
    """What a BC user's customer/item template gives a record entered in BC (CRONUS-like posting
    groups); a test passes a blank value to make a record without one."""
    if spec is CUSTOMER:
        return {"customerPostingGroup": "DOMESTIC", "genBusPostingGroup": "DOMESTIC", "vatBusPostingGroup": "DOMESTIC"}
    if values.get("type") == "Inventory":
        return {"generalProductPostingGroupCode": "RETAIL", "inventoryPostingGroupCode": "RESALE",
                "vatProdPostingGroup": "STANDARD"}
    return {"generalProductPostingGroupCode": "SERVICES", "vatProdPostingGroup": "STANDARD"}


class MasterRecords(Store):
    """Operations on customers and items."""

    def create_master(self, company: Company, spec: EntitySpec, body: Any, *, api: bool) -> Row:
        """A customer or an item (both are keyed by number and have a required display name).
        `api`: created through the API (API Setup template, counted in `creates`); otherwise by a
        BC user, who may set the fields the API does not publish."""
        values = coerce_body(spec, body, hidden=not api)
        if not values.get("displayName", "").strip():
            raise dialog('A "displayName" must be provided.')
        if spec is ITEM and "inventory" in values:
            raise dialog("Inventory cannot be changed during on insert.")
        self._validate(company, spec, values, values.get("number", ""))
        defaults = company.templates[spec.set_name] if api else user_defaults(spec, values)
        for name, default in defaults.items():
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
        for code_field, id_field in CODE_IDS.get(spec.set_name, {}).items():
            if code_field in values and id_field not in values:
                code = values[code_field]
                values[id_field] = ZERO_GUID if code in ("", LCY_CODE) and code_field == "currencyCode" \
                    else derived_id(code_field, code)

    def _validate(self, company: Company, spec: EntitySpec, values: dict[str, Any], number: str) -> None:
        """The Customer table's OnValidate triggers for the fields a request sets."""
        if spec is CUSTOMER:
            if values.get("phoneNumber"):
                check_customer_phone(values["phoneNumber"], number)
            if values.get("email"):
                check_email_addresses(values["email"])
        self._check_relations(company, spec, values)
        check_references(company.setup, spec, values)

    def modify_master(self, company: Company, spec: EntitySpec, row: Row, body: Any, *, api: bool = True) -> Row:
        values = coerce_body(spec, body, hidden=not api)
        if "displayName" in values and not values["displayName"].strip():
            raise dialog('The blank "displayName" is not allowed.')
        self._validate(company, spec, values, row.fields["number"])
        self._derive_ids(spec, values)
        fields = dict(row.fields)
        if "number" in values and values["number"] != fields["number"]:
            if not values["number"]:
                raise dialog(f"The {spec.table} number cannot be blank.")
            self._index_number(company, spec.set_name, values["number"], fields["id"], fields["number"])
        fields.update(values)
        return self._put(company, spec.set_name, fields["id"], fields)

    def delete_master(self, company: Company, spec: EntitySpec, row: Row) -> None:
        record_id, number = row.fields["id"], row.fields["number"]
        for invoice in company.tables["salesInvoices"].values():
            if invoice.fields["posted"]:
                continue
            if spec is CUSTOMER and record_id in (invoice.fields["customerId"], invoice.fields["billToCustomerId"]):
                raise dialog(f"You cannot delete Customer {number} because there is at least one outstanding "
                              "Sales Invoice for this customer.")
            if spec is ITEM and any(company.tables["salesInvoiceLines"][line_id].fields["itemId"] == record_id
                                    for line_id in company.lines_of.get(invoice.fields["id"], {})):
                raise dialog(f"You cannot delete Item {number} because there is at least one outstanding "
                              "Sales Invoice that includes this item.")
        self._journal.set(company.numbers[spec.set_name], number, MISSING)
        self._journal.set(company.tables[spec.set_name], record_id, MISSING)

