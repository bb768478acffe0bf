"""The data API of `BcSimulator`: what a BC user or administrator does in BC's own pages, for the
tests, the demo and the benchmark to arrange a situation and look at the result.

It changes the same state through the same rules as the HTTP API (a user's edit gives a record a
new ETag, a posted invoice cannot be changed), except where BC's UI differs from the API: a user
may set the fields the API does not publish (posting groups), and a record a user enters gets
CRONUS-like posting groups unless the call says otherwise. Every method is thread-safe.
"""

from __future__ import annotations

import threading
from typing import Any

from sandbox.bc.backend import Backend
from sandbox.bc.fields import SPECS, coerce_body
from sandbox.bc.store import NUMBER_SERIES_PROBLEMS, SERIES


def _entity_set(entity: str, allowed: tuple[str, ...]) -> str:
    names = {"customer": "customers", "item": "items", "salesInvoice": "salesInvoices",
             "salesInvoiceLine": "salesInvoiceLines", "countryRegion": "countriesRegions"}
    set_name = names.get(entity, entity)
    if set_name not in allowed:
        raise ValueError(f"entity must be one of {', '.join(allowed)}, not {entity!r}")
    return set_name


class DataApi:
    """Direct access to the simulated BC's data (the lock is shared with the HTTP side)."""

    _lock: threading.Lock
    _backend: Backend

    def add_company(self, tenant: str, environment: str, company_id: str | None = None,
                    name: str | None = None) -> str:
        """Create a company in an environment (creating the environment); returns its id. It starts
        with CRONUS's Country/Region list and API Setup templates with posting groups."""
        with self._lock:
            return self._backend.add_company(tenant, environment, company_id, name)

    def customers(self, company_id: str) -> list[dict]:
        """Every customer, with the fields the API does not show (``customerPostingGroup``…)."""
        return self._list(company_id, "customers")

    def items(self, company_id: str) -> list[dict]:
        return self._list(company_id, "items")

    def invoices(self, company_id: str) -> list[dict]:
        """Every sales invoice (drafts and posted), each with its ``salesInvoiceLines``."""
        return self._list(company_id, "salesInvoices")

    def countries(self, company_id: str) -> list[dict]:
        """The company's Country/Region table, by code."""
        return self._list(company_id, "countriesRegions", key="code")

    def add_customer(self, company_id: str, **fields: Any) -> dict:
        """A customer created in BC by a user (no API template, not counted in `creates`). It gets
        ``customerPostingGroup``/``genBusPostingGroup`` ``DOMESTIC`` unless given (``""``: none)."""
        return self._create(company_id, "customers", fields)

    def add_item(self, company_id: str, **fields: Any) -> dict:
        """An item created in BC by a user (no API template, not counted in `creates`). It gets
        ``generalProductPostingGroupCode`` ``SERVICES`` (an Inventory item ``RETAIL`` and
        ``inventoryPostingGroupCode`` ``RESALE``) unless given (``""``: none)."""
        return self._create(company_id, "items", fields)

    def add_country(self, company_id: str, code: str, name: str, address_format: str | None = None) -> dict:
        """A Country/Region entered in BC (``address_format`` as OData names it, e.g. ``Custom``)."""
        fields = {"code": code, "displayName": name}
        if address_format is not None:
            fields["addressFormat"] = address_format
        with self._lock, self._backend.atomic(count=False):
            company = self._backend.company(company_id)
            row = self._backend.create_country(company, fields)
            return self._backend.present(company, "countriesRegions", row)

    def remove_country(self, company_id: str, code: str) -> None:
        """A user deleting a Country/Region (BC does not check whether it is in use)."""
        with self._lock, self._backend.atomic(count=False):
            company = self._backend.company(company_id)
            record_id = company.numbers["countriesRegions"].get(code.upper())
            if record_id is None:
                raise ValueError(f"no Country/Region {code!r} in company {company_id}")
            self._backend.delete_country(company, company.tables["countriesRegions"][record_id])

    def add_dimension(self, company_id: str, code: str, name: str, blocked: bool = False) -> dict:
        """A dimension set up in BC (Dimensions page), e.g. ``add_dimension(c, "LOCATION", "Location")``."""
        with self._lock, self._backend.atomic(count=False):
            company = self._backend.company(company_id)
            row = self._backend.create_dimension(company, code, name, blocked)
            return self._backend.present(company, "dimensions", row, hidden=True)

    def add_dimension_value(self, company_id: str, dimension_code: str, code: str, name: str,
                            blocked: bool = False) -> dict:
        """A value of a dimension set up in BC (Dimension Values page)."""
        with self._lock, self._backend.atomic(count=False):
            company = self._backend.company(company_id)
            row = self._backend.create_dimension_value(company, dimension_code, code, name, blocked)
            return self._backend.present(company, "dimensionValues", row, hidden=True)

    def block_dimension_value(self, company_id: str, dimension_code: str, code: str, blocked: bool = True) -> dict:
        """A user setting (or clearing) Blocked on a dimension value."""
        with self._lock, self._backend.atomic(count=False):
            company = self._backend.company(company_id)
            row = self._backend.block_dimension_value(company, dimension_code, code, blocked)
            return self._backend.present(company, "dimensionValues", row, hidden=True)

    def add_default_dimension(self, company_id: str, source: str, number: str, code: str, value: str) -> None:
        """A Default Dimension set up in BC: ``source`` one of ``customers``, ``items``,
        ``salespeople``, ``locations``; ``number`` the record's number or code (``""``: every
        record of that table), e.g. ``add_default_dimension(c, "customers", "C00010", "LOCATION", "BERGEN")``."""
        with self._lock, self._backend.atomic(count=False):
            company = self._backend.company(company_id)
            self._backend.add_default_dimension(company, source, number, code, value)

    def dimension_sets(self, company_id: str) -> dict[str, dict[str, str]]:
        """Every invoice's and line's dimension set (record id → dimension code → value code)."""
        with self._lock:
            return {key: dict(value) for key, value in self._backend.company(company_id).dimension_sets.items()}

    def update(self, company_id: str, entity: str, record_id: str, **fields: Any) -> dict:
        """A user editing a customer, item, country, draft invoice or line in BC (the record gets a
        new ETag). Customers and items may get the fields the API does not publish."""
        set_name = _entity_set(entity, allowed=tuple(SPECS))
        with self._lock, self._backend.atomic(count=False):
            b = self._backend
            company = b.company(company_id)
            row = b.row(company, set_name, record_id.lower())
            if set_name == "salesInvoices":
                row = b.modify_invoice(company, row, fields)
            elif set_name == "salesInvoiceLines":
                row = b.modify_line(company, row, fields)
            elif set_name == "countriesRegions":
                row = b.modify_country(company, row, fields)
            else:
                row = b.modify_master(company, SPECS[set_name], row, fields, api=False)
            return b.present(company, set_name, row, expand=set_name == "salesInvoices", hidden=True)

    def delete_invoice(self, company_id: str, invoice_id: str) -> None:
        """A user deleting a draft invoice in BC."""
        with self._lock, self._backend.atomic(count=False):
            company = self._backend.company(company_id)
            self._backend.delete_invoice(company, invoice_id.lower())

    def post_invoice(self, company_id: str, invoice_id: str) -> dict:
        """A user posting a draft (released or not): status ``Open``, a posted number
        (``PS-INV103001``…; the draft's own with `BcOptions.posted_invoice_keeps_number`), same id."""
        return self._invoice_action(company_id, invoice_id, "post_invoice")

    def release_invoice(self, company_id: str, invoice_id: str) -> dict:
        """A user releasing a draft: still unposted, but the API shows status ``Open``, number unchanged;
        it cannot be changed until it is reopened."""
        return self._invoice_action(company_id, invoice_id, "release_invoice")

    def reopen_invoice(self, company_id: str, invoice_id: str) -> dict:
        """A user reopening a released draft: status ``Draft`` again."""
        return self._invoice_action(company_id, invoice_id, "reopen_invoice")

    def pay_invoice(self, company_id: str, invoice_id: str) -> dict:
        """A payment applied to a posted invoice in full: status ``Paid``."""
        return self._invoice_action(company_id, invoice_id, "pay_invoice")

    def _invoice_action(self, company_id: str, invoice_id: str, action: str) -> dict:
        with self._lock, self._backend.atomic(count=False):
            company = self._backend.company(company_id)
            row = getattr(self._backend, action)(company, invoice_id.lower())
            return self._backend.present(company, "salesInvoices", row, expand=True)

    def set_api_template(self, entity: str, company_id: str | None = None, **defaults: Any) -> None:
        """BC's "API Setup" template for ``customers`` or ``items``: values for the fields a create
        request leaves out, including those the API does not publish (``customerPostingGroup``,
        ``genBusPostingGroup``). Replaces the template of that entity (no values: none) in
        `company_id`, or in every existing company; a new company starts with CRONUS-like ones."""
        set_name = _entity_set(entity, allowed=("customers", "items"))
        for name in ("id", "number", "displayName"):
            if name in defaults:
                raise ValueError(f"an API template cannot set {name!r}")
        values = coerce_body(SPECS[set_name], defaults, hidden=True)
        with self._lock:
            companies = [self._backend.company(company_id)] if company_id else self._backend.companies.values()
            for company in companies:
                company.templates[set_name] = dict(values)

    def setup_id(self, table: str, code: str) -> str:
        """The id of a setup record (a payment terms' id for ``paymentTermsId``…), `sandbox.bc.setup`."""
        from sandbox.bc.setup import setup_id

        return setup_id(table, code.upper())

    def add_setup_record(self, company_id: str, table: str, code: str) -> None:
        """A record a user adds to a setup table (``salespeople``, ``currencies``, ``itemCategories``…)."""
        with self._lock:
            self._backend.company(company_id).setup[table].add(code.upper())

    def remove_setup_record(self, company_id: str, table: str, code: str) -> None:
        with self._lock:
            self._backend.company(company_id).setup[table].discard(code.upper())

    def set_vat_posting_setup(self, company_id: str, business_group: str, product_group: str,
                              exists: bool = True) -> None:
        """Add (or, `exists=False`, delete) the VAT Posting Setup of a business and product group."""
        pair = (business_group.upper(), product_group.upper())
        with self._lock:
            setup = self._backend.company(company_id).vat_posting_setup
            setup.add(pair) if exists else setup.discard(pair)

    def register_app(self, tenant: str, environment: str, client_id: str, registered: bool = True) -> None:
        """An admin adding an app to (or removing it from) the environment's *Microsoft Entra
        Applications* page (every app is on it until removed)."""
        from sandbox.bc.auth import register_app

        register_app(self, tenant, environment, client_id, registered)

    def set_number_series(self, company_id: str, series: str, problem: str | None) -> None:
        """Make a number series unusable (`problem` one of ``exhausted``, ``missing``, ``manual``) or
        usable again (None). `series`: ``customers``, ``items``, ``salesInvoices`` or
        ``postedSalesInvoices``. Creating a record that needs a number is then refused with BC's
        message (a customer or item given a ``number`` needs none)."""
        if series not in SERIES:
            raise ValueError(f"series must be one of {', '.join(SERIES)}, not {series!r}")
        if problem is not None and problem not in NUMBER_SERIES_PROBLEMS:
            raise ValueError(f"problem must be one of {', '.join(NUMBER_SERIES_PROBLEMS)} or None")
        with self._lock:
            company = self._backend.company(company_id)
            if problem is None:
                company.series_problems.pop(series, None)
            else:
                company.series_problems[series] = problem

    def _list(self, company_id: str, set_name: str, key: str = "number") -> list[dict]:
        with self._lock:
            b = self._backend
            company = b.company(company_id)
            rows = sorted(company.tables[set_name].values(), key=lambda row: row.fields[key])
            return [b.present(company, set_name, row, expand=set_name == "salesInvoices", hidden=True)
                    for row in rows]

    def _create(self, company_id: str, set_name: str, fields: dict[str, Any]) -> dict:
        with self._lock, self._backend.atomic(count=False):
            b = self._backend
            company = b.company(company_id)
            row = b.create_master(company, SPECS[set_name], fields, api=False)
            return b.present(company, set_name, row, hidden=True)

