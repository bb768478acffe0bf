"""The simulator's state (environments, companies, their tables) and its transactions.

Every change goes through a journal, so that a request that fails halfway, a deep insert with one
bad line or a ``$batch`` with ``Isolation: snapshot`` leaves no trace, as a rolled-back BC
transaction does. Row versions only grow; they are the source of the ETags. Number series
assign numbers the way BC's No. Series do, skipping numbers a user already took by hand, and can
be made unusable the ways a real company's can (`NUMBER_SERIES_PROBLEMS`), with BC's messages.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sandbox.bc import odata
from sandbox.bc.errors import BcError, dialog, not_found
from sandbox.bc.fields import SPECS, ZERO_GUID, EntitySpec
from sandbox.bc.options import BcOptions
from sandbox.bc.rules import must_have_value, table_relation
from sandbox.bc.setup import VAT_POSTING_SETUP, new_setup

MISSING = object()

SERIES_INDEX = {"customers": "customers", "items": "items", "salesInvoices": "salesInvoices",
                "postedSalesInvoices": "salesInvoices"}
"""The number index a series must not collide with (drafts and posted invoices share one)."""

SERIES = {"customers": ("C", 10, 5, 10), "items": ("", 1000, 0, 1), "salesInvoices": ("S-INV", 100001, 0, 1),
          "postedSalesInvoices": ("PS-INV", 103001, 0, 1)}
"""Number series: prefix, first number, digits (0: as is), increment."""

SERIES_SETUP = {"customers": ("CUST", "Customer Nos.", "Sales & Receivables Setup"),
                "items": ("ITEM1", "Item Nos.", "Inventory Setup"),
                "salesInvoices": ("S-INV", "Invoice Nos.", "Sales & Receivables Setup"),
                "postedSalesInvoices": ("S-INV+", "Posted Invoice Nos.", "Sales & Receivables Setup")}
"""Each series' No. Series code in a CRONUS company, and the setup field that names it."""

NUMBER_SERIES_PROBLEMS = ("exhausted", "missing", "manual")
"""``exhausted``: every line of the series is closed (its Ending No. was reached); ``missing``: the
setup field is blank; ``manual``: the series has Default Nos. off (numbers only by hand)."""

API_TEMPLATE_DEFAULTS = {"customers": {"customerPostingGroup": "DOMESTIC", "genBusPostingGroup": "DOMESTIC",
                                       "vatBusPostingGroup": "DOMESTIC"},
                         "items": {"generalProductPostingGroupCode": "SERVICES", "vatProdPostingGroup": "STANDARD"}}
"""What a new company's API Setup templates fill in (CRONUS-like), so that records created through
the API can be invoiced out of the box."""


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
    tables: dict[str, dict[str, Row]] = field(default_factory=lambda: {name: {} for name in SPECS})
    numbers: dict[str, dict[str, str]] = field(
        default_factory=lambda: {"customers": {}, "items": {}, "salesInvoices": {}, "countriesRegions": {},
                                 "dimensions": {}})
    """Number (or code) → id, for the entities whose number is a key."""
    dimension_values: dict[tuple[str, str], str] = field(default_factory=dict)
    """(dimension code, value code) → the dimension value's id."""
    dimension_sets: dict[str, dict[str, str]] = field(default_factory=dict)
    """Document or line id → its dimension set (dimension code → value code); none: empty."""
    default_dimensions: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    """(source, number) → its default dimensions (code → value code); number ``""``: every record
    of the source's table (BC's Account Type Default Dimension)."""
    lines_of: dict[str, dict[str, None]] = field(default_factory=dict)
    """Invoice id → its line ids."""
    series: dict[str, int] = field(default_factory=dict)
    series_problems: dict[str, str] = field(default_factory=dict)
    """Series → one of `NUMBER_SERIES_PROBLEMS`."""
    templates: dict[str, dict[str, Any]] = field(default_factory=lambda: {"customers": {}, "items": {}})
    setup: dict[str, set[str]] = field(default_factory=new_setup)
    """Setup table → its codes (`sandbox.bc.setup.SETUP_TABLES`)."""
    vat_posting_setup: set[tuple[str, str]] = field(default_factory=lambda: set(VAT_POSTING_SETUP))
    """(VAT Bus. Posting Group, VAT Prod. Posting Group) pairs that have a VAT Posting Setup."""
    """BC's "API Setup" template per entity set: values for the fields a create request left empty."""


class Journal:
    """Undo log, so that a failed request, deep insert or snapshot batch leaves no trace."""

    def __init__(self) -> None:
        self.entries: list[tuple[dict, Any, Any]] = []
        self.creates: list[str] = []

    def set(self, container: dict, key: Any, value: Any) -> None:
        self.entries.append((container, key, container.get(key, MISSING)))
        if value is MISSING:
            container.pop(key, None)
        else:
            container[key] = value

    def mark(self) -> tuple[int, int]:
        return len(self.entries), len(self.creates)

    def rollback(self, mark: tuple[int, int]) -> None:
        while len(self.entries) > mark[0]:
            container, key, old = self.entries.pop()
            if old is MISSING:
                container.pop(key, None)
            else:
                container[key] = old
        del self.creates[mark[1]:]


class Store:
    """Companies, their tables, transactions and number series. Not thread-safe: `BcSimulator`
    holds the lock around every use."""

    def __init__(self, page_size: int, options: BcOptions | None = None):
        self.page_size = page_size
        self.options = options or BcOptions()
        self.companies: dict[str, Company] = {}
        self.environments: set[tuple[str, str]] = set()
        self.creates: Counter = Counter()
        self._journal = Journal()
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
            self._journal = Journal()

    def _version(self) -> int:
        self._rowversion += 1
        return self._rowversion

    def _put(self, company: Company, set_name: str, record_id: str, fields: dict[str, Any]) -> Row:
        if "lastModifiedDateTime" in SPECS[set_name].fields:
            fields["lastModifiedDateTime"] = now()
        row = Row(fields, self._version())
        self._journal.set(company.tables[set_name], record_id, row)
        return row

    def _next_number(self, company: Company, series: str) -> str:
        self._check_series(company, series)
        prefix, start, digits, step = SERIES[series]
        taken = company.numbers[SERIES_INDEX[series]]
        current = company.series.get(series, start - step)
        while True:
            current += step
            number = f"{prefix}{current:0{digits}d}" if digits else f"{prefix}{current}"
            if number not in taken:
                break
        self._journal.set(company.series, series, current)
        return number

    @staticmethod
    def _check_series(company: Company, series: str) -> None:
        """The error BC gives when a number series cannot assign the next number."""
        problem = company.series_problems.get(series)
        code, setup_field, setup_table = SERIES_SETUP[series]
        if problem == "missing":
            raise must_have_value(setup_field, setup_table, "Primary Key", "")
        if problem == "manual":
            raise dialog("It is not possible to assign numbers automatically. If you want the program to assign "
                         f"numbers automatically, please activate Default Nos. in No. Series {code}.")
        if problem == "exhausted":
            raise dialog(f"You cannot assign new numbers from the number series {code}.")

    def _index_number(self, company: Company, set_name: str, number: str, record_id: str | None,
                      old_number: str | None = None) -> None:
        index = company.numbers[set_name]
        if number in index and index[number] != record_id:
            raise BcError(400, "Internal_EntityWithSameKeyExists",
                          f"The record in table {SPECS[set_name].table} already exists. "
                          f"Identification fields and values: No.='{number}'")
        if old_number is not None and old_number != number:
            self._journal.set(index, old_number, MISSING)
        self._journal.set(index, number, record_id)

    # environments and companies

    def add_company(self, tenant: str, environment: str, company_id: str | None, name: str | None) -> str:
        company_id = (company_id or str(uuid.uuid4())).lower()
        if not odata.is_guid(company_id) or company_id in self.companies:
            raise ValueError(f"company id {company_id!r} is not a new GUID")
        taken = {c.row.fields["name"] for c in self.companies_of(tenant, environment)}
        if name is None:
            name, counter = "CRONUS USA, Inc.", 1
            while name in taken:
                counter += 1
                name = f"CRONUS USA, Inc. ({counter})"
        created = now()
        fields = {"id": company_id, "systemVersion": "26.0.30643.32481", "timestamp": 0, "name": name,
                  "displayName": name, "businessProfileId": "", "systemCreatedAt": created,
                  "systemCreatedBy": ZERO_GUID, "systemModifiedAt": created, "systemModifiedBy": ZERO_GUID}
        version = self._version()
        fields["timestamp"] = version
        self.companies[company_id] = Company(company_id, tenant.lower(), environment.lower(), Row(fields, version))
        self.environments.add((tenant.lower(), environment.lower()))
        return company_id

    def companies_of(self, tenant: str, environment: str) -> list[Company]:
        return [c for c in self.companies.values()
                if c.tenant == tenant.lower() and c.environment == environment.lower()]

    def company(self, company_id: str, tenant: str | None = None, environment: str | None = None) -> Company:
        company = self.companies.get(company_id.lower())
        if company is None or (tenant is not None and (company.tenant, company.environment)
                               != (tenant.lower(), (environment or "").lower())):
            # DOCS webservices/dynamics-error-codes.md gives this message (for a default company).
            raise BcError(404, "Internal_CompanyNotFound", "Can't process the request because the default company "
                          "can't be found. You can specify a default company in the service configuration file, or "
                          "specify one for each tenant, or add a query string in the form of `company=[name]`.")
        return company

    @staticmethod
    def _check_relations(company: Company, spec: EntitySpec, values: dict[str, Any]) -> None:
        """A non-blank value of a field with a ``TableRelation`` must exist in the related table."""
        for name, value in values.items():
            relation = spec.fields[name].relation
            if relation and value and value not in company.numbers[relation]:
                raise table_relation(spec.fields[name].caption, spec.message_table, value, SPECS[relation].table)

    def row(self, company: Company, set_name: str, record_id: str) -> Row:
        row = company.tables[set_name].get(record_id)
        if row is None:
            raise not_found(SPECS[set_name].table, record_id)
        return row
