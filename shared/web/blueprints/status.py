"""Health for anyone (`GET /api/health`: the status and the last sync's time and outcome, the names
of failed checks, nothing private), the full status for holders of a function key
(`GET /api/status`), and the OpenAPI description."""

from __future__ import annotations

from typing import Any

import azure.functions as func
from pydantic import BaseModel, Field

from shared.web.api import ApiRequest, Problem, endpoint
from shared.flows.checks import all_checks
from shared.flows.directory.health import directory_health
from shared.runtime import runtime
from shared.flows.sync.run import last_sync

bp = func.Blueprint()


class SyncError(BaseModel):
    business_id: str | None = Field(None, alias="businessId")
    message: str


class LastSync(BaseModel):
    at: str | None = Field(description="When the latest business result of the run was written")
    outcome: str = Field(examples=["succeeded"], description="succeeded | partial | failed")
    counts: dict[str, Any] = Field(description="Totals over the businesses; each business's own result (outcome, "
                                               "at, counts) under `businesses.<businessId>`")
    errors: list[SyncError]
    run_id: str | None = Field(None, alias="runId")
    pending: list[str] = Field(default_factory=list,
                               description="Businesses not synced since the latest run began (their part is queued "
                                           "or running)")


class DirectoryHealth(BaseModel):
    customer_failures: int = Field(alias="customerFailures")
    item_failures: int = Field(alias="itemFailures")
    recent: list[dict[str, Any]] = Field(description="Up to 10 recent failures with their reasons")
    waiting: int = Field(0, description="Customers and items waiting for Business Central (an earlier create's "
                                        "outcome is unknown, or BC is throttling): they are retried on their own")
    customers_with_fields_left_out: int = Field(0, alias="customersWithFieldsLeftOut",
                                                description="Customers created without fields BC does not accept")
    left_out: list[dict[str, Any]] = Field(default_factory=list, alias="leftOut",
                                           description="Up to 10 of them: which fields, and why")


class SetupCheck(BaseModel):
    name: str = Field(examples=["businessCentral"], description="graph | businessCentral | templates | dimensions | "
                                                                "bookingsNotes (with WRITE_BACK_TO_BOOKINGS: did Bookings take "
                                                                "the latest write-back's notes)")
    ok: bool
    message: str = Field(description="What was found, or what to fix and where")


class AppStatus(BaseModel):
    status: str = Field(description="ok | degraded (the last sync was not fully successful, or a setup check "
                                    "failed) | never-synced", examples=["ok"])
    last_sync: LastSync | None = Field(alias="lastSync")
    directory: DirectoryHealth | None = None
    checks: list[SetupCheck] = Field(default_factory=list, description="Graph and Business Central reachable with the app's "
                                     "identity and permissions; the templates named in settings exist")


class LastSyncOutcome(BaseModel):
    at: str | None = Field(description="When the latest business result of the run was written")
    outcome: str = Field(examples=["succeeded"], description="succeeded | partial | failed")


class Health(BaseModel):
    """What anyone may know: nothing private (no addresses, error texts or customer data)."""
    status: str = Field(description="ok | degraded | never-synced (as in GET /api/status)", examples=["ok"])
    last_sync: LastSyncOutcome | None = Field(alias="lastSync")
    failed_checks: list[str] = Field(default_factory=list, alias="failedChecks", examples=[["businessCentral"]],
                                     description="Names of the setup checks that failed (graph | businessCentral | "
                                                 "templates); GET /api/status says why")


async def _status() -> AppStatus:
    rt = runtime()
    store = await rt.store()
    last = await last_sync(store)
    directory = await directory_health(store, rt.settings)
    checks = await all_checks(rt, store)
    if last is None:
        status = "never-synced"
    elif last["outcome"] == "succeeded" and not (directory["customerFailures"] or directory["itemFailures"]) \
            and all(check["ok"] for check in checks):
        status = "ok"
    else:
        status = "degraded"
    return AppStatus.model_validate({"status": status, "lastSync": last, "directory": directory, "checks": checks})


@bp.route(route="health", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
@endpoint("health", "GET", "health", "Health: the status and the last sync's time and outcome (anonymous)",
          responses={200: Health, 503: Problem}, anonymous=True)
async def health(request: ApiRequest) -> Health:
    full = await _status()
    last = full.last_sync
    return Health.model_validate({"status": full.status,
                                  "lastSync": {"at": last.at, "outcome": last.outcome} if last else None,
                                  "failedChecks": [check.name for check in full.checks if not check.ok]})


@bp.route(route="status", methods=["GET"])
@endpoint("status", "GET", "status", "The full status: the last sync's counts, per-business results and errors, "
          "the directory's failures, the setup checks", responses={200: AppStatus, 503: Problem})
async def status(request: ApiRequest) -> AppStatus:
    return await _status()


@bp.route(route="openapi.json", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
@endpoint("openapi", "GET", "openapi.json", "This API's OpenAPI 3.1 description",
          responses={200: dict[str, Any]}, anonymous=True)
async def openapi(request: ApiRequest) -> dict:
    from shared.web.openapi import build_document

    return build_document()
