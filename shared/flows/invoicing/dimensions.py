"""Invoice dimensions (`INVOICE_DIMENSIONS`): the BC dimension values every invoice of a business
carries, e.g. `LOCATION=OSLO` for the Oslo location of a chain.

Business Central keeps dimensions per company and checks a dimension set line against its
Dimension and Dimension Value tables, so a value the company lacks is refused. Before an invoice
is made, and in the health checks, the values named in settings are looked up in the company the
business bills into (`dimensions` with their `dimensionValues`, one request per company), and
what is missing is named with what to create in BC. API v2.0 does not publish whether a value is
blocked: BC either takes a blocked value on a draft and refuses it when the draft is posted, or
refuses it at once; the app records such a refusal (`dimensions/refused/<company>.json`) so
that the health checks name it until an invoice with that value goes through."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

from shared.runtime import Runtime
from shared.settings import Settings
from shared.storage.store import Store, encode_key, to_json

CHECK_SECONDS = 300.0
"""How long a process trusts a company's dimension values before it reads them again."""
REFUSED = "dimensions/refused/{company}.json"

_checked: dict[tuple[int, str], tuple[float, dict[str, dict]]] = {}


def dimension_set_key(dimensions: dict[str, str]) -> str:
    """A stable text for a set of dimension values (`LOCATION=OSLO;DEPT=SALES`, sorted)."""
    return ";".join(f"{code}={value}" for code, value in sorted(dimensions.items()))


def parse_dimension_set(text: str | None) -> dict[str, str]:
    return dict(item.split("=", 1) for item in (text or "").split(";") if "=" in item)


def wanted_in(settings: Settings, company_id: str) -> dict[str, dict[str, str]]:
    """Business → its dimension values, for the businesses that bill into the company."""
    return {business: settings.dimensions_of(business) for business in settings.business_ids
            if settings.invoice_dimensions.get(business) and settings.company_of(business) == company_id}


def problems_in(found: dict[str, dict], wanted: dict[str, dict[str, str]], company_name: str) -> list[str]:
    """What the company lacks of the wanted values, each with what to create in BC."""
    problems: list[str] = []
    for business, dimensions in wanted.items():
        for code, value in sorted(dimensions.items()):
            dimension = found.get(code)
            source = business if business == "INVOICE_DIMENSIONS" else f"INVOICE_DIMENSIONS for {business}"
            if dimension is None:
                problems.append(f"Business Central company '{company_name}' has no dimension {code} ({source}). Fix: "
                                f"create dimension {code} on BC's Dimensions page, then its value {value} under "
                                "Dimension Values.")
            elif value not in {v.get("code") for v in dimension.get("dimensionValues") or []}:
                problems.append(f"Business Central company '{company_name}' has no value {value} of dimension {code} "
                                f"({source}). Fix: on BC's Dimensions page, open {code} → Dimension Values and "
                                f"create {value}.")
    return list(dict.fromkeys(problems))


async def company_dimensions(rt: Runtime, company_id: str, fresh: bool = False, extra: tuple[str, ...] = ()
                             ) -> dict[str, dict]:
    """The company's dimensions named in settings, with their values (read at most every
    `CHECK_SECONDS` per process unless `fresh`)."""
    codes = sorted({code for dims in wanted_in(rt.settings, company_id).values() for code in dims} | set(extra))
    key = (id(rt.settings), company_id)
    cached = _checked.get(key)
    if cached and not fresh and cached[0] > time.monotonic():
        return cached[1]
    found = await rt.bc_for(company_id).dimensions(codes) if codes else {}
    _checked[key] = (time.monotonic() + CHECK_SECONDS, found)
    return found


async def problem_of(rt: Runtime, company_id: str, dimensions: dict[str, str]) -> str | None:
    """Why an invoice in the company cannot carry these dimension values now, or None."""
    if not dimensions:
        return None
    wanted = {"INVOICE_DIMENSIONS": dimensions}
    codes = tuple(sorted(dimensions))
    if not problems_in(await company_dimensions(rt, company_id, extra=codes), wanted, company_id):
        return None
    # BC may have changed since the last read: read again before refusing.
    found = await company_dimensions(rt, company_id, fresh=True, extra=codes)
    return " ".join(problems_in(found, wanted, await rt.bc_for(company_id).name())) or None


# -- refusals BC made (blocked values) --------------------------------------------------------------

def _blob(company_id: str) -> str:
    return REFUSED.format(company=encode_key(company_id))


async def record_refusal(store: Store, company_id: str, dimensions: dict[str, str], message: str) -> None:
    """BC refused an invoice's dimension values: kept for the health checks."""
    recorded = await refusals_of(store, company_id)
    recorded[dimension_set_key(dimensions)] = {"message": message[:1000],
                                               "at": datetime.now(timezone.utc).isoformat()}
    await store.write_blob(_blob(company_id), to_json(recorded).encode(), "application/json")


async def clear_refusal(store: Store, company_id: str, dimensions: dict[str, str]) -> None:
    """An invoice with these values went through: BC takes them again."""
    recorded = await refusals_of(store, company_id)
    if recorded.pop(dimension_set_key(dimensions), None) is not None:
        await store.write_blob(_blob(company_id), to_json(recorded).encode(), "application/json")


async def refusals_of(store: Store, company_id: str) -> dict[str, dict]:
    raw = await store.read_blob(_blob(company_id))
    return json.loads(raw) if raw else {}
