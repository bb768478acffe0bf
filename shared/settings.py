"""The app's settings, read from the environment (Function App settings in Azure,
`local.settings.json` under `func start`).

Reading settings never happens at import time: the app must index with an empty environment.
A function that needs a setting calls `get_settings()` (or one of the narrower `require_*`), and a
missing or invalid value fails that function only, with a `SettingsError` naming the setting."""

from __future__ import annotations

import os
import zoneinfo
from functools import lru_cache
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator
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
    """How long Business Central may go on executing a request after it arrived (its documented
    limit is 10 minutes). A write whose outcome is unknown (timeout, lost answer) is looked up,
    and repeated if missing, only once this has passed: before, BC may still be creating it."""
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

    @field_validator("business_ids", mode="before")
    @classmethod
    def _split_ids(cls, value):
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("customer_template", "item_template", "bc_environment", "bc_company_id",
                     "tenant_id", "client_id", "client_secret", "storage_connection", "pages_redirect_uri",
                     "federated_identity_client_id", "bc_customer_filter", "bc_item_filter",
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
        """`{BC_BASE_URL}/{tenant}/{environment}/api/v2.0/companies({id})`."""
        self.require("tenant_id", "bc_environment", "bc_company_id")
        return (f"{self.bc_base_url}/{self.tenant_id}/{self.bc_environment}"
                f"/api/v2.0/companies({self.bc_company_id})")

    @property
    def bc_batch_url(self) -> str:
        self.require("tenant_id", "bc_environment")
        return f"{self.bc_base_url}/{self.tenant_id}/{self.bc_environment}/api/v2.0/$batch"

    def require(self, *fields: str) -> None:
        """Raise `SettingsError` naming every listed setting that is not set."""
        missing = [setting_name(name) for name in fields if not getattr(self, name)]
        if missing:
            raise SettingsError(f"Setting {', '.join(missing)} is required but not set.")


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
            field = item["loc"][0] if item["loc"] else "?"
            name = setting_name(field) if field in Settings.model_fields else field
            problems.append(f"{name}: {item['msg']}")
        raise SettingsError("Invalid setting " + "; ".join(problems)) from None


def get_settings() -> Settings:
    """The current settings. Cached per distinct environment, so tests may change variables."""
    names = setting_names()
    return _load(tuple((name, os.environ.get(name)) for name in names))
