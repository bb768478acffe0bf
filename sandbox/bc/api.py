"""Routing of one API call to the backend: which entity, which record, which method.

The path grammar is BC's: ``companies({id})/customers({id})``, an invoice's
``salesInvoiceLines``, the bound action ``Microsoft.NAV.post``; keys are unquoted GUIDs
(``id=`` allowed). A call runs in one transaction: if it fails, nothing it changed stays.
"""

from __future__ import annotations

import re
from typing import Any

from sandbox.bc import odata
from sandbox.bc.answers import collection, single
from sandbox.bc.backend import Backend
from sandbox.bc.errors import BcError, dialog, not_found
from sandbox.bc.etags import check_if_match
from sandbox.bc.fields import COMPANY, COUNTRY, DIMENSION, DIMENSION_SET_LINE, DIMENSION_VALUE, INVOICE, LINE, SPECS
from sandbox.bc.store import Company, Row
from sandbox.bc.wire import BAD_BODY, NO_BODY, ApiRequest, ApiResponse, error_response

_SEGMENT = re.compile(r"^(?P<name>[A-Za-z][A-Za-z0-9_.]*)(?:\((?P<key>[^()]*)\))?$")


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


class Api:
    """Routes one `ApiRequest` to the backend and shapes the OData answer."""

    def __init__(self, backend: Backend):
        self.b = backend

    def handle(self, request: ApiRequest) -> ApiResponse:
        try:
            with self.b.atomic():
                return self._dispatch(request)
        except BcError as error:
            return error_response(error)
        except odata.ODataError as error:
            return error_response(BcError(400, error.code, str(error)))

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
            return single(self.b, r, company, "companies", company.row, f"companies({company.id})")
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
        return collection(self.b, r, None, COMPANY, list(rows.values()), "companies", default_order="name")

    def _entities(self, r: ApiRequest, company: Company, segments: list[tuple[str, str | None]]) -> ApiResponse:
        (name, key), rest = segments[0], segments[1:]
        base = f"companies({company.id})/{name}"
        if name not in SPECS:
            raise BcError(404, "BadRequest_ResourceNotFound", f"Resource not found for the segment '{name}'.")
        spec = SPECS[name]
        record_id = _key(key)
        if name == "salesInvoiceLines":
            return self._lines(r, company, None, record_id, rest, base)
        if spec in (DIMENSION, DIMENSION_VALUE):
            return self._dimensions(r, company, spec, record_id, rest, base)
        if record_id is None:
            if rest:
                raise BcError(400, "BadRequest", f"An id is required: {name}({{id}})/….")
            if r.method == "GET":
                rows = list(company.tables[name].values())
                return collection(self.b, r, company, SPECS[name], rows, base,
                                  default_order="code" if spec is COUNTRY else "number")
            self._only(r, "POST", name)
            body = self._body(r)
            if name == "salesInvoices":
                row = self.b.create_invoice(company, body, api=True)
            elif spec is COUNTRY:
                row = self.b.create_country(company, body)
            else:
                row = self.b.create_master(company, SPECS[name], body, api=True)
            return single(self.b, r, company, name, row, f"{base}({row.fields['id']})", status=201)
        row = self.b.row(company, name, record_id)
        if rest:
            if name != "salesInvoices":
                raise BcError(404, "BadRequest_ResourceNotFound", f"Resource not found for the segment '{rest[0][0]}'.")
            sub, sub_key = rest[0]
            if sub == "dimensionSetLines":
                return self._dimension_set_lines(r, company, name, row, _key(sub_key), rest[1:],
                                                 f"{base}({record_id})/{sub}")
            if sub == "salesInvoiceLines":
                return self._lines(r, company, record_id, _key(sub_key), rest[1:], f"{base}({record_id})/{sub}")
            if sub.lower() == "microsoft.nav.post" and len(rest) == 1:
                self._only(r, "POST", sub)
                self.b.post_invoice(company, record_id)
                return ApiResponse(204)
            raise BcError(404, "BadRequest_ResourceNotFound", f"Resource not found for the segment '{sub}'.")
        url = f"{base}({record_id})"
        if r.method == "GET":
            return single(self.b, r, company, name, row, url)
        if r.method == "PATCH":
            self._if_match(r, row)
            body = self._body(r)
            if spec is INVOICE:
                row = self.b.modify_invoice(company, row, body)
            elif spec is COUNTRY:
                row = self.b.modify_country(company, row, body)
            else:
                row = self.b.modify_master(company, spec, row, body)
            return single(self.b, r, company, name, row, url)
        if r.method == "DELETE":
            self._if_match(r, row)
            if spec is INVOICE:
                self.b.delete_invoice(company, record_id)
            elif spec is COUNTRY:
                self.b.delete_country(company, row)
            else:
                self.b.delete_master(company, spec, row)
            return ApiResponse(204)
        raise BcError(405, "BadRequest_MethodNotAllowed",
                      f"'{r.method}' requests for '{name}' are not allowed within Dynamics 365 Business Central "
                      "OData web services.")

    def _dimensions(self, r: ApiRequest, company: Company, spec, record_id: str | None, rest: list,
                    base: str) -> ApiResponse:
        """The read-only ``dimensions`` and ``dimensionValues`` pages (and a dimension's values)."""
        self._only(r, "GET", spec.set_name)
        if record_id is None:
            if rest:
                raise BcError(400, "BadRequest", f"An id is required: {spec.set_name}({{id}})/….")
            return collection(self.b, r, company, spec, list(company.tables[spec.set_name].values()), base,
                              default_order="code")
        row = self.b.row(company, spec.set_name, record_id)
        if not rest:
            return single(self.b, r, company, spec.set_name, row, f"{base}({record_id})")
        (sub, sub_key), more = rest[0], rest[1:]
        if spec is not DIMENSION or sub != "dimensionValues" or more:
            raise BcError(404, "BadRequest_ResourceNotFound", f"Resource not found for the segment '{sub}'.")
        values = self.b.values_of(company, record_id)
        url = f"{base}({record_id})/dimensionValues"
        value_id = _key(sub_key)
        if value_id is None:
            return collection(self.b, r, company, DIMENSION_VALUE, values, url, default_order="code")
        found = next((v for v in values if v.fields["id"] == value_id), None)
        if found is None:
            raise not_found(DIMENSION_VALUE.table, value_id)
        return single(self.b, r, company, "dimensionValues", found, f"{url}({value_id})")

    def _dimension_set_lines(self, r: ApiRequest, company: Company, parent_set: str, parent: Row,
                             dimension_id: str | None, rest: list, base: str) -> ApiResponse:
        """A sales invoice's or line's ``dimensionSetLines`` (keyed by the dimension's id)."""
        if rest:
            raise BcError(404, "BadRequest_ResourceNotFound", f"Resource not found for the segment '{rest[0][0]}'.")
        parent_id = parent.fields["id"]
        if dimension_id is None:
            if r.method == "GET":
                rows = self.b.dimension_set_lines(company, parent_set, parent_id, parent.version)
                return collection(self.b, r, company, DIMENSION_SET_LINE, rows, base, default_order="code")
            self._only(r, "POST", "dimensionSetLines")
            code, _ = self.b.add_dimension_set_line(company, parent_id, self._body(r))
            parent = self._touch(company, parent_set, parent_id)
            line = next(row for row in self.b.dimension_set_lines(company, parent_set, parent_id, parent.version)
                        if row.fields["code"] == code)
            return single(self.b, r, company, "dimensionSetLines", line, f"{base}({line.fields['id']})", status=201)
        line = next((row for row in self.b.dimension_set_lines(company, parent_set, parent_id, parent.version)
                     if row.fields["id"] == dimension_id), None)
        if line is None:
            raise not_found(DIMENSION_SET_LINE.table, dimension_id)
        url = f"{base}({dimension_id})"
        if r.method == "GET":
            return single(self.b, r, company, "dimensionSetLines", line, url)
        if r.method == "PATCH":
            self._if_match(r, line)
            self.b.change_dimension_set_line(company, parent_id, line.fields["code"], self._body(r))
            parent = self._touch(company, parent_set, parent_id)
            line = next(row for row in self.b.dimension_set_lines(company, parent_set, parent_id, parent.version)
                        if row.fields["id"] == dimension_id)
            return single(self.b, r, company, "dimensionSetLines", line, url)
        if r.method == "DELETE":
            self._if_match(r, line)
            self.b.remove_dimension_set_line(company, parent_id, line.fields["code"])
            self._touch(company, parent_set, parent_id)
            return ApiResponse(204)
        raise BcError(405, "BadRequest_MethodNotAllowed",
                      f"'{r.method}' requests for 'dimensionSetLines' are not allowed within Dynamics 365 Business "
                      "Central OData web services.")

    def _touch(self, company: Company, set_name: str, record_id: str) -> Row:
        """The parent's Modify(true) when its dimension set changed: a new row version (ETag)."""
        row = self.b.row(company, set_name, record_id)
        return self.b._put(company, set_name, record_id, dict(row.fields))

    def _lines(self, r: ApiRequest, company: Company, invoice_id: str | None, line_id: str | None,
               rest: list, base: str) -> ApiResponse:
        if rest and line_id is not None and rest[0][0] == "dimensionSetLines":
            line = self.b.row(company, "salesInvoiceLines", line_id)
            if invoice_id is not None and line.fields["documentId"] != invoice_id:
                raise not_found(LINE.table, line_id)
            return self._dimension_set_lines(r, company, "salesInvoiceLines", line, _key(rest[0][1]), rest[1:],
                                             f"{base}({line_id})/dimensionSetLines")
        if rest:
            raise BcError(404, "BadRequest_ResourceNotFound", f"Resource not found for the segment '{rest[0][0]}'.")
        table = company.tables["salesInvoiceLines"]
        if line_id is None:
            if r.method == "GET":
                if invoice_id is None:
                    filter_text = r.query.get("$filter")
                    if not filter_text or "documentId" not in odata.filter_fields(filter_text):
                        raise dialog("You must specify an Id or a Document Id to get the lines.")
                    rows = list(table.values())
                else:
                    rows = self.b.lines(company, invoice_id)
                return collection(self.b, r, company, LINE, rows, base, default_order="sequence")
            self._only(r, "POST", "salesInvoiceLines")
            body = self._body(r)
            target = invoice_id
            if target is None:
                document_id = body.get("documentId") if isinstance(body, dict) else None
                if not isinstance(document_id, str) or not odata.is_guid(document_id):
                    raise dialog("You must specify a parent ID (documentId) to create a line.")
                target = document_id.lower()
            self.b.row(company, "salesInvoices", target)
            row = self.b.create_line(company, target, body, api=True)
            return single(self.b, r, company, "salesInvoiceLines", row, f"{base}({row.fields['id']})", status=201)
        row = self.b.row(company, "salesInvoiceLines", line_id)
        if invoice_id is not None and row.fields["documentId"] != invoice_id:
            raise not_found(LINE.table, line_id)
        url = f"{base}({line_id})"
        if r.method == "GET":
            return single(self.b, r, company, "salesInvoiceLines", row, url)
        if r.method == "PATCH":
            self._if_match(r, row)
            row = self.b.modify_line(company, row, self._body(r))
            return single(self.b, r, company, "salesInvoiceLines", row, url)
        if r.method == "DELETE":
            self._if_match(r, row)
            self.b.delete_line(company, row)
            return ApiResponse(204)
        raise BcError(405, "BadRequest_MethodNotAllowed",
                      f"'{r.method}' requests for 'salesInvoiceLines' are not allowed within Dynamics 365 "
                      "Business Central OData web services.")

    @staticmethod
    def _body(r: ApiRequest) -> Any:
        if r.body is NO_BODY or r.body is BAD_BODY:
            raise BcError(400, "BadRequest", "Invalid Request Body")
        return r.body


    @staticmethod
    def _if_match(r: ApiRequest, row: Row) -> None:
        check_if_match(r.headers.get("if-match"), row.version)
