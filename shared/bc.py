"""Business Central API v2.0: the one client that builds BC URLs, plus the fields BC accepts.

BC serves about 5 requests at a time per environment (more are queued, then throttled), so the
client holds at most 5 in flight. Lookups use `$filter` with OData string escaping (`'` → `''`),
so an e-mail such as `o'brien@example.com` is a value, never syntax. Writes of existing records
send `If-Match` with the record's ETag."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlencode

from pydantic import BaseModel, ConfigDict, Field

from shared.http import ApiClient, UpstreamAmbiguous, UpstreamError, UpstreamNotFound, error_from_body
from shared.settings import Settings

log = logging.getLogger(__name__)

ENVIRONMENT_CONCURRENCY = 5
MAX_BATCH_REQUESTS = 100
LOOKUP_CHUNK = 40
"""Values per `or` filter: keeps the URL well under the limits of gateways in front of BC."""


def odata_string(value: str) -> str:
    """An OData string literal: quotes doubled, so the value can never end the literal."""
    return "'" + value.replace("'", "''") + "'"


class CustomerFields(BaseModel):
    """Writable BC customer fields a template may default (`type` is always `Person`)."""
    model_config = ConfigDict(extra="forbid")
    displayName: str | None = Field(None, max_length=100)
    addressLine1: str | None = Field(None, max_length=100)
    addressLine2: str | None = Field(None, max_length=50)
    city: str | None = Field(None, max_length=30)
    state: str | None = Field(None, max_length=30)
    country: str | None = Field(None, max_length=10)
    postalCode: str | None = Field(None, max_length=20)
    phoneNumber: str | None = Field(None, max_length=30)
    email: str | None = Field(None, max_length=80)
    website: str | None = Field(None, max_length=80)
    salespersonCode: str | None = Field(None, max_length=20)
    creditLimit: float | None = Field(None, ge=0)
    taxLiable: bool | None = None
    taxAreaId: str | None = None
    taxRegistrationNumber: str | None = Field(None, max_length=20)
    currencyId: str | None = None
    currencyCode: str | None = Field(None, max_length=10)
    paymentTermsId: str | None = None
    shipmentMethodId: str | None = None
    paymentMethodId: str | None = None
    blocked: str | None = Field(None, pattern=r"^(_x0020_|Ship|Invoice|All)$")


class ItemFields(BaseModel):
    """Writable BC item fields a template may default (`type` is always `Service`)."""
    model_config = ConfigDict(extra="forbid")
    displayName: str | None = Field(None, max_length=100)
    displayName2: str | None = Field(None, max_length=50)
    itemCategoryId: str | None = None
    itemCategoryCode: str | None = Field(None, max_length=20)
    blocked: bool | None = None
    gtin: str | None = Field(None, max_length=14)
    unitPrice: float | None = Field(None, ge=0)
    priceIncludesTax: bool | None = None
    unitCost: float | None = Field(None, ge=0)
    taxGroupId: str | None = None
    taxGroupCode: str | None = Field(None, max_length=20)
    baseUnitOfMeasureId: str | None = None
    baseUnitOfMeasureCode: str | None = Field(None, max_length=10)
    generalProductPostingGroupId: str | None = None
    generalProductPostingGroupCode: str | None = Field(None, max_length=20)
    inventoryPostingGroupId: str | None = None
    inventoryPostingGroupCode: str | None = Field(None, max_length=20)


TEMPLATE_FIELDS: dict[str, type[BaseModel]] = {"customer": CustomerFields, "item": ItemFields}


class BcClient:
    def __init__(self, api: ApiClient, settings: Settings):
        self.api = api
        self.company_url = settings.bc_company_url
        self.company_path = f"companies({settings.bc_company_id})"
        self.batch_url = settings.bc_batch_url

    # -- generic -------------------------------------------------------------------------------

    async def list(self, entity_set: str, filter: str | None = None, extra: dict | None = None) -> list[dict]:
        params = dict(extra or {})
        if filter:
            params["$filter"] = filter
        url: str | None = f"{self.company_url}/{entity_set}"
        found: list[dict] = []
        while url:
            response = await self.api.request("GET", url, params=params or None)
            body = response.body if isinstance(response.body, dict) else {}
            if not isinstance(body.get("value"), list):
                raise UpstreamError(self.api.service, response.status, "MalformedResponse",
                                    f"the {entity_set} list had no 'value'")
            found.extend(body["value"])
            url, params = body.get("@odata.nextLink"), None
        return found

    async def get(self, entity_set: str, entity_id: str, extra: dict | None = None) -> dict | None:
        try:
            response = await self.api.request("GET", f"{self.company_url}/{entity_set}({entity_id})",
                                              params=extra or None)
        except UpstreamNotFound:
            return None
        return _entity(response.body)

    async def create(self, entity_set: str, fields: dict) -> dict:
        """POST. A lost answer raises `UpstreamAmbiguous`: look the record up before repeating."""
        response = await self.api.request("POST", f"{self.company_url}/{entity_set}", json_body=fields,
                                          idempotent=False)
        return _entity(response.body)

    async def update(self, entity_set: str, entity_id: str, etag: str, changes: dict) -> dict:
        response = await self.api.request("PATCH", f"{self.company_url}/{entity_set}({entity_id})",
                                          json_body=changes, headers={"If-Match": etag})
        return _entity(response.body)

    async def batch(self, requests: list[dict], atomic: bool = False, idempotent: bool = True) -> list[dict]:
        """JSON `$batch` of ≤ 100 inner requests (`method`, `url` relative to the company).
        Answers in request order: `{status, body}` per inner request."""
        if len(requests) > MAX_BATCH_REQUESTS:
            raise ValueError("a BC batch holds at most 100 requests")
        payload = {"requests": [
            {"id": str(index), "method": request["method"], "url": f"{self.company_path}/{request['url']}",
             "headers": {"Content-Type": "application/json", **request.get("headers", {})},
             **({"body": request["body"]} if "body" in request else {})}
            for index, request in enumerate(requests)]}
        # All-or-nothing batches stop at the first failure; independent ones (reads) should
        # answer every request, which OData only does when asked to continue on error.
        headers = {"Isolation": "snapshot"} if atomic else {"Prefer": "odata.continue-on-error"}
        response = await self.api.request("POST", self.batch_url, json_body=payload, headers=headers,
                                          idempotent=idempotent)
        answers = {str(item.get("id")): item for item in (response.body or {}).get("responses", [])}
        if len(answers) != len(requests):
            raise UpstreamError(self.api.service, response.status, "MalformedResponse",
                                "the batch answer did not cover every request")
        return [answers[str(index)] for index in range(len(requests))]

    # -- entities ------------------------------------------------------------------------------

    async def customers_by_emails(self, emails: list[str]) -> dict[str, list[dict]]:
        """Many e-mails with few requests: `email eq 'a' or email eq 'b' …` per chunk."""
        return await self._by_values("customers", "email", emails, lambda c: True)

    async def items_by_names(self, names: list[str]) -> dict[str, list[dict]]:
        return await self._by_values("items", "displayName", names, lambda i: i.get("type") == "Service")

    async def _by_values(self, entity_set: str, field: str, values: list[str], keep) -> dict[str, list[dict]]:
        """One `or` filter per chunk of values; several chunks go in one `$batch` (one round
        trip, and one of BC's concurrent-request slots, instead of one each)."""
        wanted = sorted({v.strip().lower() for v in values if v and v.strip()})
        filters = [" or ".join(f"{field} eq {odata_string(value)}" for value in wanted[i:i + LOOKUP_CHUNK])
                   for i in range(0, len(wanted), LOOKUP_CHUNK)]
        if len(filters) == 1:
            pages = [await self.list(entity_set, filters[0])]
        else:
            pages = []
            for start in range(0, len(filters), MAX_BATCH_REQUESTS):
                chunk = filters[start:start + MAX_BATCH_REQUESTS]
                answers = await self.batch([{"method": "GET", "url": f"{entity_set}?{urlencode({'$filter': f})}"}
                                            for f in chunk])
                pages += [await self._list_answer(entity_set, f, answer) for f, answer in zip(chunk, answers, strict=True)]
        found: dict[str, list[dict]] = {value: [] for value in wanted}
        for page in pages:
            for record in page:
                value = (record.get(field) or "").strip().lower()
                if value in found and keep(record):
                    found[value].append(record)
        return found

    async def _list_answer(self, entity_set: str, filter: str, answer: dict) -> list[dict]:
        """The records of one list answered inside a `$batch`; a failed or paged one is read
        again on its own (`list` retries and follows `nextLink`)."""
        body = answer.get("body")
        status = int(answer.get("status") or 0)
        if 200 <= status < 300 and isinstance(body, dict) and isinstance(body.get("value"), list) \
                and not body.get("@odata.nextLink"):
            return body["value"]
        return await self.list(entity_set, filter)

    async def create_many(self, entity_set: str, records: list[dict]) -> list[dict | UpstreamError]:
        """Create records with one request per 100 (`$batch`); answers in order, each the new
        record or the error BC gave for it. A lost answer raises `UpstreamAmbiguous`."""
        if len(records) == 1:
            try:
                return [await self.create(entity_set, records[0])]
            except UpstreamAmbiguous:
                raise
            except UpstreamError as error:
                return [error]
        results: list[dict | UpstreamError] = []
        for start in range(0, len(records), MAX_BATCH_REQUESTS):
            chunk = records[start:start + MAX_BATCH_REQUESTS]
            answers = await self.batch([{"method": "POST", "url": entity_set, "body": record} for record in chunk],
                                       idempotent=False)
            for answer in answers:
                status = int(answer.get("status") or 0)
                body = answer.get("body")
                if 200 <= status < 300 and isinstance(body, dict) and "id" in body:
                    results.append(body)
                else:
                    error = body.get("error", {}) if isinstance(body, dict) else {}
                    results.append(error_from_body(self.api.service, status, body, str(error.get("message", ""))))
        return results

    async def invoices_by_external_numbers(self, keys: list[str]) -> dict[str, list[dict]]:
        """Invoices by our deterministic external document numbers (few requests for many)."""
        found = await self._by_values("salesInvoices", "externalDocumentNumber", keys, lambda i: True)
        return {key: found.get(key.strip().lower(), []) for key in keys}

    async def invoices_by_id(self, ids: list[str]) -> dict[str, dict | None]:
        """Current state of many invoices with few round trips (`$batch`); None = deleted."""
        found: dict[str, dict | None] = {}
        for start in range(0, len(ids), MAX_BATCH_REQUESTS):
            chunk = ids[start:start + MAX_BATCH_REQUESTS]
            answers = await self.batch([{"method": "GET", "url": f"salesInvoices({invoice_id})"}
                                        for invoice_id in chunk])
            for invoice_id, answer in zip(chunk, answers, strict=True):
                status = int(answer.get("status") or 0)
                if status == 404:
                    found[invoice_id] = None
                elif 200 <= status < 300:
                    found[invoice_id] = _entity(answer.get("body"))
                else:
                    body = answer.get("body") or {}
                    error = body.get("error", {}) if isinstance(body, dict) else {}
                    raise UpstreamError(self.api.service, status, error.get("code", f"HTTP{status}"),
                                        error.get("message", "reading an invoice failed"))
        return found


def _entity(body: Any) -> dict:
    if not isinstance(body, dict) or "id" not in body:
        raise UpstreamError("Business Central", None, "MalformedResponse", "the answer had no record")
    return body
