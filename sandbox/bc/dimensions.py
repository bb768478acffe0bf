"""Dimensions, dimension values and the dimension sets of sales invoices and their lines.

The API pages `dimensions` and `dimensionValues` are read-only: a BC user creates dimensions and
their values (and blocks them) in BC. A sales invoice's dimensions are its ``dimensionSetLines``
(APIV2DimensionSetLines.Page.al): one line per dimension, given by ``id`` or ``code`` and a value
by ``valueId`` or ``valueCode``, each checked against the Dimension and Dimension Value tables with
the page's own messages. Saving them gives the *header* a new Dimension Set ID by assignment, not
validation, so lines that already exist keep theirs; a line takes the header's set when it is
created (SalesLine.CreateDim inherits ``SalesHeader."Dimension Set ID"``). Whether a value is
blocked is checked when the invoice is posted (DimensionManagement.CheckDimValuePosting), unless
`BcOptions.refuse_blocked_dimension_values` makes the page refuse it at once.

Default dimensions (a BC user's Default Dimensions of a customer, item, salesperson or location,
or of every record of that table) give a new document its first dimension set: a sales header
those of its bill-to customer, its salesperson and its location, in that order (without Default
Dimension Priorities the first source that has a dimension wins), a line the header's set
merged with its item's (`BcOptions.line_default_dims_override_header`: whose value wins).
"""

from __future__ import annotations

import uuid
from typing import Any

from sandbox.bc.errors import BcError, dialog
from sandbox.bc.fields import DIMENSION, DIMENSION_SET_LINE, DIMENSION_VALUE, coerce_body
from sandbox.bc.store import MISSING, Company, Row, Store

PARENT_TYPES = {"salesInvoices": "Sales_x0020_Invoice", "salesInvoiceLines": "Sales_x0020_Invoice_x0020_Line"}
DEFAULT_DIMENSION_SOURCES = {"customers": "Customer", "items": "Item", "salespeople": "Salesperson/Purchaser",
                             "locations": "Location"}
"""The tables whose Default Dimensions the simulator applies, by the name the data API takes."""
"""Enum "Dimension Set Entry Buffer Parent Type" members of the parents the simulator serves, as
OData names an enum member (a space is ``_x0020_``, as in ``lineType``'s ``Fixed_x0020_Asset``)."""


class Dimensions(Store):
    """Operations on dimensions, their values, and the dimension sets of invoices and lines."""

    # what a BC user does (data API)

    def create_dimension(self, company: Company, code: str, name: str, blocked: bool = False) -> Row:
        values = coerce_body(DIMENSION, {"code": code, "displayName": name, "blocked": blocked}, hidden=True,
                             writable=True)
        if values["code"] in company.numbers["dimensions"]:
            raise BcError(400, "Internal_EntityWithSameKeyExists", "The record in table Dimension already exists. "
                          f"Identification fields and values: Code='{values['code']}'")
        fields = {name: f.blank for name, f in DIMENSION.fields.items()} | values | {"id": str(uuid.uuid4())}
        self._journal.set(company.numbers["dimensions"], fields["code"], fields["id"])
        return self._put(company, "dimensions", fields["id"], fields)

    def create_dimension_value(self, company: Company, dimension_code: str, code: str, name: str,
                               blocked: bool = False) -> Row:
        dimension = self.dimension(company, dimension_code.upper())
        if dimension is None:
            raise dialog(f"The Dimension does not exist. Identification fields and values: Code='{dimension_code}'")
        values = coerce_body(DIMENSION_VALUE, {"code": code, "displayName": name, "blocked": blocked,
                                               "dimensionCode": dimension.fields["code"]}, hidden=True, writable=True)
        key = (dimension.fields["code"], values["code"])
        if key in company.dimension_values:
            raise BcError(400, "Internal_EntityWithSameKeyExists", "The record in table Dimension Value already "
                          f"exists. Identification fields and values: Dimension Code='{key[0]}',Code='{key[1]}'")
        fields = {name: f.blank for name, f in DIMENSION_VALUE.fields.items()} | values
        fields |= {"id": str(uuid.uuid4()), "dimensionId": dimension.fields["id"]}
        self._journal.set(company.dimension_values, key, fields["id"])
        return self._put(company, "dimensionValues", fields["id"], fields)

    def block_dimension_value(self, company: Company, dimension_code: str, code: str, blocked: bool) -> Row:
        record_id = company.dimension_values.get((dimension_code.upper(), code.upper()))
        if record_id is None:
            raise dialog(f"Dimension Value {dimension_code} - {code} is missing.")
        row = company.tables["dimensionValues"][record_id]
        return self._put(company, "dimensionValues", record_id, {**row.fields, "blocked": blocked})

    def add_default_dimension(self, company: Company, source: str, number: str, code: str, value: str) -> None:
        """A Default Dimension of a record (``number``) or of its whole table (``number`` blank)."""
        if source not in DEFAULT_DIMENSION_SOURCES:
            raise ValueError(f"source must be one of {', '.join(DEFAULT_DIMENSION_SOURCES)}, not {source!r}")
        number, code, value = number.strip().upper(), code.strip().upper(), value.strip().upper()
        if number and source in company.numbers and number not in company.numbers[source]:
            raise dialog(f"The {DEFAULT_DIMENSION_SOURCES[source]} does not exist. Identification fields and values: "
                         f"No.='{number}'")
        if self.dimension_value(company, code, value) is None:
            raise dialog(f"Dimension Value {code} - {value} is missing.")
        key = (source, number)
        self._journal.set(company.default_dimensions, key, company.default_dimensions.get(key, {}) | {code: value})

    def default_dimensions(self, company: Company, sources: list[tuple[str, str]]) -> dict[str, str]:
        """DimensionManagement.GetDefaultDimID without priorities: for each source in turn (one
        with a number), its record's Default Dimensions, then its table's; a dimension takes the
        first value found."""
        found: dict[str, str] = {}
        for source, number in sources:
            if not number:
                continue
            for key in ((source, number), (source, "")):
                for code, value in sorted(company.default_dimensions.get(key, {}).items()):
                    found.setdefault(code, value)
        return found

    # lookups

    @staticmethod
    def dimension(company: Company, code: str) -> Row | None:
        record_id = company.numbers["dimensions"].get(code)
        return company.tables["dimensions"][record_id] if record_id else None

    @staticmethod
    def dimension_value(company: Company, dimension_code: str, code: str) -> Row | None:
        record_id = company.dimension_values.get((dimension_code, code))
        return company.tables["dimensionValues"][record_id] if record_id else None

    def values_of(self, company: Company, dimension_id: str) -> list[Row]:
        return sorted((row for row in company.tables["dimensionValues"].values()
                       if row.fields["dimensionId"] == dimension_id), key=lambda row: row.fields["code"])

    # dimension sets

    def dimension_set(self, company: Company, record_id: str) -> dict[str, str]:
        return dict(company.dimension_sets.get(record_id, {}))

    def set_dimension_set(self, company: Company, record_id: str, dimensions: dict[str, str]) -> None:
        self._journal.set(company.dimension_sets, record_id, dict(dimensions) if dimensions else MISSING)

    def dimension_set_lines(self, company: Company, parent_set: str, parent_id: str, version: int) -> list[Row]:
        """A parent's dimension set as the page shows it (ordered by dimension code)."""
        rows = []
        for code, value_code in sorted(self.dimension_set(company, parent_id).items()):
            dimension = self.dimension(company, code)
            value = self.dimension_value(company, code, value_code)
            rows.append(Row({
                "id": dimension.fields["id"] if dimension else "", "code": code,
                "consolidationCode": dimension.fields["consolidationCode"] if dimension else "",
                "parentId": parent_id, "parentType": PARENT_TYPES[parent_set],
                "displayName": dimension.fields["displayName"] if dimension else "",
                "valueId": value.fields["id"] if value else "", "valueCode": value_code,
                "valueConsolidationCode": value.fields["consolidationCode"] if value else "",
                "valueDisplayName": value.fields["displayName"] if value else ""}, version))
        return rows

    def add_dimension_set_line(self, company: Company, parent_id: str, body: Any) -> tuple[str, str]:
        """POST: the page's OnInsertRecord. Returns (dimension code, value code)."""
        code, value_code = self._line_values(company, body, existing=None)
        current = self.dimension_set(company, parent_id)
        if code in current:
            raise dialog("The dimension set line already exists. Check existing dimension set lines and the default "
                         "dimension set lines on the parent.")
        self.set_dimension_set(company, parent_id, current | {code: value_code})
        return code, value_code

    def change_dimension_set_line(self, company: Company, parent_id: str, code: str, body: Any) -> str:
        """PATCH: only the value may change (``id`` and ``code`` may not)."""
        _, value_code = self._line_values(company, body, existing=code)
        self.set_dimension_set(company, parent_id, self.dimension_set(company, parent_id) | {code: value_code})
        return value_code

    def remove_dimension_set_line(self, company: Company, parent_id: str, code: str) -> None:
        current = self.dimension_set(company, parent_id)
        current.pop(code, None)
        self.set_dimension_set(company, parent_id, current)

    def _line_values(self, company: Company, body: Any, existing: str | None) -> tuple[str, str]:
        values = coerce_body(DIMENSION_SET_LINE, body)
        dimension = None
        if "id" in values:
            dimension = company.tables["dimensions"].get(values["id"])
            if dimension is None:
                raise dialog('The "id" does not match to a Dimension.')
        if values.get("code"):
            if dimension is not None and dimension.fields["code"] != values["code"]:
                raise dialog("The dimension field values do not match to a specific Dimension.")
            dimension = dimension or self.dimension(company, values["code"])
            if dimension is None:
                raise dialog('The "code" does not match to a Dimension.')
        if existing is not None:
            if dimension is not None and dimension.fields["code"] != existing:
                raise dialog('The "id" and "code" fields cannot be modified.')
            dimension = self.dimension(company, existing)
        if dimension is None:
            raise dialog('The "id" or "code" field must be filled in.')
        code = dimension.fields["code"]
        value = None
        if "valueId" in values:
            value = company.tables["dimensionValues"].get(values["valueId"])
            if value is None:
                raise dialog('The "valueId" does not match to a Dimension Value.')
        if values.get("valueCode"):
            if value is not None and value.fields["code"] != values["valueCode"]:
                raise dialog('The values of the "dimensionCode" field and the "dimensionId" field do not refer to '
                             'the same Dimension Value.')
            value = value or self.dimension_value(company, code, values["valueCode"])
            if value is None:
                raise dialog('The "valueCode" does not match to a Dimension Value.')
        if value is None:
            raise dialog('The "valueId" or "valueCode" field must be filled in.')
        if self.options.refuse_blocked_dimension_values:
            problem = self._blocked(company, code, value.fields["code"])
            if problem:
                raise dialog(problem)
        return code, value.fields["code"]

    def _blocked(self, company: Company, code: str, value_code: str) -> str | None:
        """DimensionManagement.CheckDim / CheckDimValue, worded as BC words them."""
        dimension = self.dimension(company, code)
        if dimension is None:
            return f"Dimension {code} can't be found."
        if dimension.fields["blocked"]:
            return f"Dimension {code} is blocked."
        value = self.dimension_value(company, code, value_code)
        if value is None:
            return f"Dimension Value {code} - {value_code} is missing."
        if value.fields["blocked"]:
            return f"Dimension Value {code} - {value_code} is blocked."
        return None

    def check_posting_dimensions(self, company: Company, invoice: Row, line_ids: list[str]) -> None:
        """What posting checks (CheckDimensions): no blocked dimension or value on the header or a line."""
        number = invoice.fields["number"]
        for code, value_code in sorted(self.dimension_set(company, invoice.fields["id"]).items()):
            problem = self._blocked(company, code, value_code)
            if problem:
                raise dialog(f"The dimensions used in Invoice {number} are invalid. {problem}")
        for line_id in line_ids:
            line = company.tables["salesInvoiceLines"][line_id]
            for code, value_code in sorted(self.dimension_set(company, line_id).items()):
                problem = self._blocked(company, code, value_code)
                if problem:
                    raise dialog(f"The dimensions used in Invoice {number}, line no. {line.fields['sequence']} are "
                                 f"invalid. {problem}")
