"""The whole simulated Business Central: state, master records, countries, invoices, and how a
record looks in an answer.

`Backend` combines the parts (`store`, `masters`, `countries`, `invoices`), sets up a new company
the way a CRONUS company starts (its Country/Region list, API Setup templates with posting
groups), and adds the presentation every answer shares: the fields the API page publishes, the
``@odata.etag`` and, for an invoice, its lines.
"""

from __future__ import annotations

from typing import Any

from sandbox.bc.countries import CountryRegions
from sandbox.bc.etags import etag
from sandbox.bc.fields import SPECS, coerce_body, json_value, spec_of
from sandbox.bc.invoices import SalesInvoices
from sandbox.bc.masters import MasterRecords
from sandbox.bc.store import API_TEMPLATE_DEFAULTS, Company, Row


class Backend(MasterRecords, SalesInvoices, CountryRegions):
    """The whole state and every operation on it. Not thread-safe: `BcSimulator` holds the lock."""

    def add_company(self, tenant: str, environment: str, company_id: str | None, name: str | None) -> str:
        company_id = super().add_company(tenant, environment, company_id, name)
        company = self.companies[company_id]
        with self.atomic(count=False):
            self.seed_countries(company)
        for set_name, defaults in API_TEMPLATE_DEFAULTS.items():
            company.templates[set_name] = coerce_body(SPECS[set_name], defaults, hidden=True)
        return company_id

    def present(self, company: Company | None, set_name: str, row: Row, select: list[str] | None = None,
                expand: bool | tuple[str, ...] | dict[str, dict] = False, hidden: bool = False) -> dict[str, Any]:
        """A record as the API shows it; `hidden`: with the fields only a BC user sees (data API).
        `expand`: the navigation properties to include, each with what to expand inside it (True:
        an invoice's lines; the data API also shows each one's dimension set)."""
        spec = spec_of(set_name)
        names = select or (list(spec.fields) if hidden else spec.public())
        result: dict[str, Any] = {"@odata.etag": etag(row.version)}
        result.update((name, json_value(row.fields[name])) for name in names)
        if expand is True:
            expand = {"salesInvoiceLines": {}}
        elif not isinstance(expand, dict):
            expand = {name: {} for name in expand or ()}
        if company is not None and "salesInvoiceLines" in expand:
            result["salesInvoiceLines"] = [self.present(company, "salesInvoiceLines", line,
                                                        expand=expand["salesInvoiceLines"], hidden=hidden)
                                           for line in self.lines(company, row.fields["id"])]
        if company is not None and "dimensionSetLines" in expand:
            result["dimensionSetLines"] = [self.present(company, "dimensionSetLines", line) for line in
                                           self.dimension_set_lines(company, set_name, row.fields["id"], row.version)]
        if company is not None and "dimensionValues" in expand:
            result["dimensionValues"] = [self.present(company, "dimensionValues", value)
                                         for value in self.values_of(company, row.fields["id"])]
        if hidden and company is not None and set_name in ("salesInvoices", "salesInvoiceLines"):
            result["dimensions"] = self.dimension_set(company, row.fields["id"])
        return result
