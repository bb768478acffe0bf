"""The app's settings, read from the environment (Function App settings in Azure,
`local.settings.json` under `func start`).

Reading settings never happens at import time: the app must index with an empty environment.
A function that needs a setting calls `get_settings()` (or one of the narrower `require_*`), and a
missing or invalid value fails that function only, with a `SettingsError` naming the setting."""

from __future__ import annotations

import os
import re
import zoneinfo
from datetime import datetime
from functools import lru_cache
from typing import Annotated, Literal
from urllib.parse import urlsplit

from cronsim import CronSim, CronSimError
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.odata_filter import CUSTOMER_FILTER_FIELDS, ITEM_FILTER_FIELDS, InvalidFilter, validate_filter

PUBLIC_AUTHORITY_HOST = "https://login.microsoftonline.com"
PAGES_CALLBACK_PATH = "/api/pages/signin/callback"
"""Where Entra ID sends people back after they sign in to the operator pages."""
OPERATOR_ROLE = "Invoicing.Operator"
"""The app role the pages require by default (the postprovision hook defines it on the app registration)."""
ANY_MEMBER = "*"
"""`PAGES_ALLOWED_ROLE` value that lets every member of the tenant in, without an app role."""
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
GRAPH_SCOPE = "https://graph.microsoft.com/.default"
BC_SCOPE = "https://api.businesscentral.dynamics.com/.default"


class SettingsError(Exception):
    """A setting the function needs is missing or invalid. The message names the setting."""


class Settings(BaseSettings):
    """Every setting of the app. Field aliases are the exact environment names (SPEC §5)."""

    model_config = SettingsConfigDict(populate_by_name=True, extra="ignore", case_sensitive=True)

    storage_connection: str | None = Field(None, alias="AzureWebJobsStorage")
    """Connection string of the storage account (tables, queues, blobs), or unset when the
    identity-based `AzureWebJobsStorage__accountName` / `__tableServiceUri` settings are used."""
    storage_account_name: str | None = Field(None, alias="AzureWebJobsStorage__accountName")
    storage_client_id: str | None = Field(None, alias="AzureWebJobsStorage__clientId")

    tenant_id: str | None = Field(None, alias="AZURE_TENANT_ID")
    client_id: str | None = Field(None, alias="AZURE_CLIENT_ID")
    client_secret: str | None = Field(None, alias="AZURE_CLIENT_SECRET", repr=False)
    federated_identity_client_id: str | None = Field(None, alias="AZURE_FEDERATED_IDENTITY_CLIENT_ID")
    """The user-assigned managed identity the app registration trusts (federated credential): with it,
    the app signs in as `AZURE_CLIENT_ID` without any secret."""
    authority_host: str = Field(PUBLIC_AUTHORITY_HOST, alias="AZURE_AUTHORITY_HOST")

    graph_base_url: str = Field("https://graph.microsoft.com/v1.0", alias="GRAPH_BASE_URL")
    bc_base_url: str = Field("https://api.businesscentral.dynamics.com/v2.0", alias="BC_BASE_URL")
    bc_environment: str | None = Field(None, alias="BC_ENVIRONMENT")
    bc_company_id: str | None = Field(None, alias="BC_COMPANY_ID")

    business_ids: Annotated[list[str], NoDecode] = Field(
        default_factory=list, alias="BOOKINGS_BUSINESS_IDS"
    )
    sync_schedule: str = Field("0 */15 * * * *", alias="SYNC_SCHEDULE")
    sync_lookback_days: int = Field(60, ge=0, le=3650, alias="SYNC_LOOKBACK_DAYS")
    sync_lookahead_days: int = Field(30, ge=0, le=3650, alias="SYNC_LOOKAHEAD_DAYS")
    sync_customers: bool = Field(True, alias="SYNC_CUSTOMERS")
    sync_items: bool = Field(True, alias="SYNC_ITEMS")
    customer_template: str | None = Field(None, alias="CUSTOMER_TEMPLATE")
    item_template: str | None = Field(None, alias="ITEM_TEMPLATE")
    invoice_free_bookings: bool = Field(False, alias="INVOICE_FREE_BOOKINGS")
    write_back_to_bookings: bool = Field(False, alias="WRITE_BACK_TO_BOOKINGS")
    time_zone: str = Field("UTC", alias="BOOKINGS_TIME_ZONE")
    http_timeout_seconds: float = Field(60.0, gt=0, le=600, alias="HTTP_TIMEOUT_SECONDS")
    bc_execution_limit_seconds: float = Field(600.0, gt=0, le=3600, alias="BC_EXECUTION_LIMIT_SECONDS")
    """How long Business Central may go on executing a request once it has started (its documented
    limit is 10 minutes). A write whose outcome is unknown (timeout, lost answer) is repeated, if a
    lookup does not find it, only once this and `bc_queue_timeout_seconds` have passed: before,
    BC may still be creating it."""
    bc_queue_timeout_seconds: float = Field(480.0, ge=0, le=3600, alias="BC_QUEUE_TIMEOUT_SECONDS")
    """How long a request may wait in Business Central's queue for one of its 5 slots before BC
    gives up on it with 503 (documented: 8 minutes). A request the app stopped waiting for may
    start only then, so it counts toward the settle time too."""
    push_customers: bool = Field(False, alias="PUSH_CUSTOMERS_TO_BOOKINGS")
    """Each sync also puts BC customers (persons with an e-mail) into every Bookings business."""
    push_items: bool = Field(False, alias="PUSH_ITEMS_TO_BOOKINGS")
    """Each sync also puts BC service items into every Bookings business as services."""
    bc_customer_filter: str | None = Field(None, alias="BC_CUSTOMER_FILTER")
    """OData `$filter` narrowing the customers pushed, e.g. `city eq 'Oslo'` (BC API v2.0 fields)."""
    bc_item_filter: str | None = Field(None, alias="BC_ITEM_FILTER")
    """OData `$filter` narrowing the service items pushed, e.g. `itemCategoryCode eq 'HAIR'`."""
    bc_web_client_url: str = Field("https://businesscentral.dynamics.com", alias="BC_WEB_CLIENT_URL")
    """Where people open Business Central: the pages link each draft invoice there."""
    pages_allowed_role: str = Field(OPERATOR_ROLE, alias="PAGES_ALLOWED_ROLE")
    """The app role (its value) of the app registration a user must hold to use the operator pages;
    empty means the default, `*` every member of the tenant who can sign in to the app."""
    pages_allow_guests: bool = Field(False, alias="PAGES_ALLOW_GUESTS")
    """Let guests of the tenant (B2B users, `idp` ≠ `iss`) use the pages too, if they hold the role."""
    pages_redirect_uri: str | None = Field(None, alias="PAGES_REDIRECT_URI")
    """The pages' sign-in redirect URI, `https://<host>/api/pages/signin/callback` (infra sets it):
    the one URL the app gives Entra ID, and the origin its forms must come from. Unset: a request
    to a loopback address (a local run) uses its own."""
    business_companies: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict,
                                                                   alias="BUSINESS_COMPANIES")
    """`business-id=company-id` pairs: the BC company each named business bills into (customers,
    items and invoices live per company); businesses not named use `BC_COMPANY_ID`."""
    invoice_dimensions: Annotated[dict[str, dict[str, str]], NoDecode] = Field(default_factory=dict,
                                                                              alias="INVOICE_DIMENSIONS")
    """`business-id:CODE=VALUE` entries: BC dimension values put on every invoice the business bills
    (the invoice's `dimensionSetLines`, which its lines inherit); a business may have several."""
    billing_period: Literal["month", "week"] | None = Field(None, alias="BILLING_PERIOD")
    """`month` or `week`: each billing run invoices what ended before the end of the last closed
    period; unset: no billing runs."""
    billing_schedule: str = Field("0 0 6 1 * *", alias="BILLING_SCHEDULE")
    """NCRONTAB of the billing timer (`%BILLING_SCHEDULE%`); a run happens at most once a period."""

    @field_validator("business_ids", mode="before")
    @classmethod
    def _split_ids(cls, value):
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("customer_template", "item_template", "bc_environment", "bc_company_id",
                     "tenant_id", "client_id", "client_secret", "storage_connection", "pages_redirect_uri",
                     "federated_identity_client_id", "bc_customer_filter", "bc_item_filter", "billing_period",
                     mode="before")
    @classmethod
    def _blank_is_unset(cls, value):
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("pages_allowed_role", mode="before")
    @classmethod
    def _blank_is_default_role(cls, value):
        return OPERATOR_ROLE if value is None or (isinstance(value, str) and not value.strip()) else value.strip()

    @field_validator("pages_redirect_uri")
    @classmethod
    def _callback_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value.strip())
        if parts.scheme not in ("https", "http") or not parts.hostname or parts.query or parts.fragment:
            raise ValueError("must be an absolute URL without query or fragment")
        if parts.scheme == "http" and parts.hostname not in LOOPBACK_HOSTS:
            raise ValueError("must be https (http only for localhost)")
        if parts.path != PAGES_CALLBACK_PATH:
            raise ValueError(f"must end with {PAGES_CALLBACK_PATH}")
        return value.strip()

    @field_validator("bc_customer_filter", "bc_item_filter")
    @classmethod
    def _valid_filter(cls, value: str | None, info):
        if value is None:
            return None
        fields = CUSTOMER_FILTER_FIELDS if info.field_name == "bc_customer_filter" else ITEM_FILTER_FIELDS
        try:
            return validate_filter(value, fields)
        except InvalidFilter as error:
            raise ValueError(f"not an OData $filter Business Central can take: {error}") from None

    @field_validator("bc_company_id")
    @classmethod
    def _company_guid(cls, value: str | None) -> str | None:
        if value is not None and not GUID.fullmatch(value.strip()):
            raise ValueError(f"{value!r} is not a company id (a GUID)")
        return value.strip().lower() if value else value

    @field_validator("business_companies", mode="before")
    @classmethod
    def _pairs(cls, value):
        if not isinstance(value, str):
            return value
        pairs: dict[str, str] = {}
        for entry in (part.strip() for part in value.split(",")):
            if not entry:
                continue
            business, sep, company = (text.strip() for text in entry.rpartition("="))
            if not sep or not business or not company:
                raise ValueError(f"{entry!r} is not a business-id=company-id pair")
            if not GUID.fullmatch(company):
                raise ValueError(f"{company!r} (for {business}) is not a company id (a GUID)")
            if business in pairs:
                raise ValueError(f"{business} is named twice")
            pairs[business] = company.lower()
        return pairs

    @field_validator("invoice_dimensions", mode="before")
    @classmethod
    def _dimensions(cls, value):
        if not isinstance(value, str):
            return value
        found: dict[str, dict[str, str]] = {}
        for entry in (part.strip() for part in value.split(",")):
            if not entry:
                continue
            business, sep, assignment = (text.strip() for text in entry.rpartition(":"))
            code, equals, dimension_value = (text.strip().upper() for text in assignment.partition("="))
            if not sep or not business or not equals:
                raise ValueError(f"{entry!r} is not a business-id:CODE=VALUE entry")
            for what, text in (("dimension code", code), ("dimension value", dimension_value)):
                if not DIMENSION_CODE.fullmatch(text):
                    raise ValueError(f"{text!r} in {entry!r} is not a {what} (1–20 characters, as BC's Code fields)")
            if code in found.get(business, {}):
                raise ValueError(f"{business} has dimension {code} twice")
            found.setdefault(business, {})[code] = dimension_value
        return found

    @field_validator("billing_schedule")
    @classmethod
    def _ncrontab(cls, value: str) -> str:
        value = value.strip()
        if len(value.split()) != 6:
            raise ValueError("must be an NCRONTAB expression of six fields ({second} {minute} {hour} {day} "
                             "{month} {day-of-week}), e.g. 0 0 6 1 * *")
        try:
            next(CronSim(value, datetime(2000, 1, 1)))
        except (CronSimError, StopIteration, ValueError) as error:
            raise ValueError(f"not an NCRONTAB expression: {error}") from None
        return value

    @model_validator(mode="after")
    def _known_businesses(self):
        for name, mapping in (("BUSINESS_COMPANIES", self.business_companies),
                              ("INVOICE_DIMENSIONS", self.invoice_dimensions)):
            unknown = [business for business in mapping if business not in self.business_ids]
            if unknown and self.business_ids:
                raise ValueError(f"{name} names {', '.join(unknown)}, not in BOOKINGS_BUSINESS_IDS")
        return self

    @field_validator("time_zone")
    @classmethod
    def _known_time_zone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as error:
            raise ValueError(f"unknown IANA time zone {value!r}") from error
        return value

    @field_validator("graph_base_url", "bc_base_url", "authority_host", "bc_web_client_url")
    @classmethod
    def _absolute_https_url(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError("must be an absolute http(s) URL")
        return value.rstrip("/")

    @property
    def pages_need_role(self) -> str | None:
        """The app role the pages require, or None when every member may use them."""
        return None if self.pages_allowed_role == ANY_MEMBER else self.pages_allowed_role

    @property
    def is_public_authority(self) -> bool:
        return self.authority_host == PUBLIC_AUTHORITY_HOST

    @property
    def bc_company_url(self) -> str:
        """`{BC_BASE_URL}/{tenant}/{environment}/api/v2.0/companies({id})` of `BC_COMPANY_ID`."""
        self.require("bc_company_id")
        return self.company_url(self.bc_company_id)

    def company_url(self, company_id: str) -> str:
        """`{BC_BASE_URL}/{tenant}/{environment}/api/v2.0/companies({id})`."""
        self.require("tenant_id", "bc_environment")
        return f"{self.bc_base_url}/{self.tenant_id}/{self.bc_environment}/api/v2.0/companies({company_id})"

    def company_of(self, business_id: str) -> str:
        """The BC company a business bills into: its `BUSINESS_COMPANIES` entry, else `BC_COMPANY_ID`."""
        company = self.business_companies.get(business_id)
        if company:
            return company
        if not self.bc_company_id:
            raise SettingsError(f"Setting BC_COMPANY_ID is required but not set (business {business_id} is not "
                                "named in BUSINESS_COMPANIES).")
        return self.bc_company_id

    @property
    def companies(self) -> list[str]:
        """Every BC company the businesses bill into, `BC_COMPANY_ID` first when it is used."""
        found = []
        for business in self.business_ids:
            company = self.business_companies.get(business) or self.bc_company_id
            if company and company not in found:
                found.append(company)
        if not found and self.bc_company_id:
            found.append(self.bc_company_id)
        return found

    def dimensions_of(self, business_id: str) -> dict[str, str]:
        """The dimension values (code → value) every invoice of the business carries."""
        return dict(self.invoice_dimensions.get(business_id, {}))

    @property
    def bc_batch_url(self) -> str:
        self.require("tenant_id", "bc_environment")
        return f"{self.bc_base_url}/{self.tenant_id}/{self.bc_environment}/api/v2.0/$batch"

    def require(self, *fields: str) -> None:
        """Raise `SettingsError` naming every listed setting that is not set."""
        missing = [setting_name(name) for name in fields if not getattr(self, name)]
        if missing:
            raise SettingsError(f"Setting {', '.join(missing)} is required but not set.")


GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
DIMENSION_CODE = re.compile(r"[^\s,:=][^,:=]{0,19}")
"""BC's Dimension "Code" and Dimension Value "Code" are Code[20] (upper-cased, trimmed)."""


def setting_name(field: str) -> str:
    return Settings.model_fields[field].alias or field


SECRET_SETTINGS = frozenset({"storage_connection", "client_secret"})
"""Shown as set or not, never by value (a connection string may hold an account key)."""


def settings_in_force(settings: Settings) -> list[tuple[str, str | None, bool]]:
    """(name, value as text or None when unset, hidden) of every setting, for the setup page."""
    shown = []
    for field, info in Settings.model_fields.items():
        value = getattr(settings, field)
        if isinstance(value, list):
            value = ",".join(value)
        elif isinstance(value, dict):
            value = ",".join(f"{key}={item}" if isinstance(item, str) else
                             ",".join(f"{key}:{code}={code_value}" for code, code_value in item.items())
                             for key, item in value.items()) or None
        text = None if value is None or value == "" else str(value).lower() if isinstance(value, bool) else str(value)
        hidden = field in SECRET_SETTINGS and text is not None
        shown.append((info.alias or field, None if hidden else text, hidden))
    return shown


def setting_names() -> list[str]:
    """Every environment name the app reads (used by the config-drift tests)."""
    return [info.alias for info in Settings.model_fields.values() if info.alias]


@lru_cache(maxsize=1)
def _load(environment_key: tuple) -> Settings:
    try:
        return Settings()
    except ValidationError as error:
        problems = []
        for item in error.errors():
            if not item["loc"]:  # a check across settings: its message names them
                problems.append(item["msg"].removeprefix("Value error, "))
                continue
            field = item["loc"][0]
            name = setting_name(field) if field in Settings.model_fields else field
            problems.append(f"{name}: {item['msg']}")
        raise SettingsError("Invalid setting " + "; ".join(problems)) from None


def get_settings() -> Settings:
    """The current settings. Cached per distinct environment, so tests may change variables."""
    names = setting_names()
    return _load(tuple((name, os.environ.get(name)) for name in names))
