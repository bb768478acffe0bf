"""Business Central API v2.0: the one client that builds BC URLs, plus the fields BC accepts.

BC serves about 5 requests at a time per user (more are queued, then throttled) and 6,000 per
5-minute sliding window, so the client holds at most 5 in flight and keeps its own budget.
Lookups follow BC's filter semantics and limits (`shared/upstream/bc_lookups.py`): Text fields compare
case-sensitively, so e-mails and item names are matched through `tolower`; Code fields (such as
`externalDocumentNumber`) are stored upper-case, so their keys are made and sent upper-case; a
value longer than the field cannot exist in BC and is never sent (BC refuses the whole filter);
filters are packed to BC's node limit and sent many to a `$batch`. Literals use OData string
escaping (`'` → `''`), so an e-mail such as `o'brien@example.com` is a value, never syntax. Writes
of existing records send `If-Match` with the record's ETag.

BC runs the requests of a `$batch` one after another and may go on executing a request after
the client stopped waiting, so creates are batched small enough to finish well inside
`HTTP_TIMEOUT_SECONDS` (`creates_per_batch`). After an unknown outcome a record is looked for
again within seconds and then less often (`confirm`), and created again only once BC cannot be
running the first create any more (`settled_at`)."""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shared.upstream.bc_lookups import SCHEMA_2_1, Lookup, Query, email_addresses, odata_string, pack, query_string, term
from shared.upstream.bc_refusals import explain_refusal, web_client_invoice_url  # noqa: F401  (BC's refusals, links)
from shared.upstream.errors import (
    NOT_RUN_STATUS,
    UpstreamAmbiguous,
    UpstreamError,
    UpstreamNotFound,
    UpstreamThrottled,
    error_from_body,
)
from shared.upstream.http import ApiClient
from shared.settings import Settings
from shared.upstream.utf16 import Utf16Max

log = logging.getLogger(__name__)

API_ROLE = "API.ReadWrite.All"
"""The application permission BC's API needs (besides the app's entry in BC itself)."""
ENVIRONMENT_CONCURRENCY = 5
REQUESTS_PER_WINDOW = 6000
WINDOW_SECONDS = 300.0
MAX_BATCH_REQUESTS = 100
UNKNOWN_OUTCOME_STATUS = {408, 504}
"""Inside a finished batch, BC timed this request out: it may still complete (BC's docs: 408
after the operation timeout, 504 after the 10-minute execution limit)."""
CUSTOMERS_BY_EMAIL = Lookup("customers", "email", address_list=True)
ITEMS_BY_NAME = Lookup("items", "displayName")
INVOICES_BY_KEY = Lookup("salesInvoices", "externalDocumentNumber", code=True)

COMPANY_NAME_SECONDS = 3600.0
NESTED_CHECK_SECONDS = 3600.0
"""How long an environment's answer to the nested-call check (`BcClient.nested_calls`) is kept."""
NESTED_UNKNOWN_SECONDS = 60.0
"""How long "no customer with an e-mail to try" is kept (asked before each lookup, a third of a first sync's BC requests)."""
_nested_verdicts: weakref.WeakKeyDictionary[ApiClient, tuple[float, str]] = weakref.WeakKeyDictionary()
_no_sample_until: weakref.WeakKeyDictionary[ApiClient, dict[str, float]] = weakref.WeakKeyDictionary()
"""Until when a company has no customer with an e-mail (nested calls are the environment's; samples a company's)."""

SECONDS_PER_CREATE = {"customers": 0.2, "items": 0.2, "salesInvoices": 0.5}
"""A generous estimate of what BC spends creating one record inside a `$batch` (an invoice with
its lines by deep insert counts as one). Batches are sized so that a normal one takes at most a
third of `HTTP_TIMEOUT_SECONDS`: with the default 60 s, 100 customers or items (20 s) and 40
invoices (20 s) per batch."""


CONFIRM_DELAYS = (2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0)
"""Seconds between the lookups after an unknown outcome: soon at first (BC usually has the record
a few seconds after a lost answer), then less often; the last one repeats until the settle time."""
CONFIRMING = "waiting for Business Central to confirm"
"""What a part or record waiting for BC to show a write of unknown outcome says (with since when)."""


@dataclass(frozen=True)
class Wait:
    """Work that must wait for BC: until when; since when a write of it may have been sent (None:
    certainly never); why; whether it used up an attempt (an unknown outcome or a server error, as
    opposed to throttling, which only slows the app down and never makes it give up); and, while
    BC is asked to confirm a write of unknown outcome, since when that outcome is unknown."""
    until: datetime
    pending_since: datetime | None
    reason: str
    attempt: bool = False
    confirming_since: datetime | None = None


def next_lookup(confirming_since: datetime, now: datetime, settled: datetime) -> datetime:
    """When to look for a write of unknown outcome next: the first point of the `CONFIRM_DELAYS`
    schedule from `confirming_since` that is still to come, and never after `settled` (then a
    lookup that finds nothing means the write did not happen)."""
    at, index = confirming_since, 0
    while at <= now and at < settled:
        at += timedelta(seconds=CONFIRM_DELAYS[min(index, len(CONFIRM_DELAYS) - 1)])
        index += 1
    return min(at, settled)


def creates_per_batch(entity_set: str, timeout_seconds: float) -> int:
    return max(1, min(MAX_BATCH_REQUESTS, int(timeout_seconds / 3 / SECONDS_PER_CREATE[entity_set])))


class CustomerFields(BaseModel):
    """Writable BC customer fields a template may default (`type` is always `Person`). Text
    lengths are BC's, in UTF-16 units (an emoji counts 2)."""
    model_config = ConfigDict(extra="forbid")
    displayName: Utf16Max(100) = None
    addressLine1: Utf16Max(100) = None
    addressLine2: Utf16Max(50) = None
    city: Utf16Max(30) = None
    state: Utf16Max(30) = None
    country: Utf16Max(10) = None
    postalCode: Utf16Max(20) = None
    phoneNumber: Utf16Max(30) = None
    email: Utf16Max(80) = None
    website: Utf16Max(80) = None
    salespersonCode: Utf16Max(20) = None
    creditLimit: float | None = Field(None, ge=0)
    taxLiable: bool | None = None
    taxAreaId: str | None = None
    taxRegistrationNumber: Utf16Max(20) = None
    currencyId: str | None = None
    currencyCode: Utf16Max(10) = None
    paymentTermsId: str | None = None
    shipmentMethodId: str | None = None
    paymentMethodId: str | None = None
    blocked: str | None = Field(None, pattern=r"^(_x0020_|Ship|Invoice|All)$")


class ItemFields(BaseModel):
    """Writable BC item fields a template may default (`type` is always `Service`)."""
    model_config = ConfigDict(extra="forbid")
    displayName: Utf16Max(100) = None
    displayName2: Utf16Max(50) = None
    itemCategoryId: str | None = None
    itemCategoryCode: Utf16Max(20) = None
    blocked: bool | None = None
    gtin: Utf16Max(14) = None
    unitPrice: float | None = Field(None, ge=0)
    priceIncludesTax: bool | None = None
    unitCost: float | None = Field(None, ge=0)
    taxGroupId: str | None = None
    taxGroupCode: Utf16Max(20) = None
    baseUnitOfMeasureId: str | None = None
    baseUnitOfMeasureCode: Utf16Max(10) = None
    generalProductPostingGroupId: str | None = None
    generalProductPostingGroupCode: Utf16Max(20) = None
    inventoryPostingGroupId: str | None = None
    inventoryPostingGroupCode: Utf16Max(20) = None


TEMPLATE_FIELDS: dict[str, type[BaseModel]] = {"customer": CustomerFields, "item": ItemFields}


class BcClient:
    """One BC company (`BC_COMPANY_ID`, or the company a business bills into): its URLs. The
    companies of one environment share one `ApiClient` (its slots, budget and tokens)."""

    def __init__(self, api: ApiClient, settings: Settings, company_id: str | None = None):
        self.api = api
        self.company_id = company_id or settings.bc_company_id
        if not self.company_id:
            settings.require("bc_company_id")
        self.company_url = settings.company_url(self.company_id)
        self.company_path = f"companies({self.company_id})"
        self.batch_url = settings.bc_batch_url
        self.timeout_seconds = settings.http_timeout_seconds
        self.execution_limit_seconds = settings.bc_execution_limit_seconds
        self.queue_timeout_seconds = settings.bc_queue_timeout_seconds
        self._name: tuple[float, str] | None = None

    # -- unknown outcomes ----------------------------------------------------------------------

    @property
    def send_window_seconds(self) -> float:
        """How long after its claim a write may still be sent: room for the lookup that comes
        first and for the write itself, one `HTTP_TIMEOUT_SECONDS` each."""
        return 2 * self.timeout_seconds

    def send_by(self, since: datetime) -> float:
        """The `time.monotonic()` deadline for sending writes claimed at `since`. Writes are
        never sent after it, so `settled_at` holds."""
        elapsed = (datetime.now(timezone.utc) - since).total_seconds()
        return time.monotonic() - elapsed + self.send_window_seconds

    def settled_at(self, pending_since: datetime) -> datetime:
        """When no write claimed at `pending_since` can still be running in BC: its send
        deadline, plus the longest it may wait in BC's queue for a slot (`BC_QUEUE_TIMEOUT_SECONDS`;
        BC answers 503 after that and never runs it), plus BC's execution limit once it runs
        (`BC_EXECUTION_LIMIT_SECONDS`). Only then does looking it up tell for sure whether it
        happened."""
        return pending_since + timedelta(seconds=self.send_window_seconds + self.queue_timeout_seconds
                                         + self.execution_limit_seconds)

    def confirm(self, pending_since: datetime, confirming_since: datetime | None = None,
                attempt: bool = False) -> Wait:
        """Wait for BC to show a write sent since `pending_since` whose outcome became unknown at
        `confirming_since` (now, when not given): look again soon, then less often, and only
        once it is settled may a lookup that finds nothing lead to sending it again."""
        now = datetime.now(timezone.utc)
        since = confirming_since or now
        settled = self.settled_at(pending_since)
        return Wait(next_lookup(since, now, settled), pending_since, CONFIRMING, attempt=attempt,
                    confirming_since=since)

    # -- generic -------------------------------------------------------------------------------

    async def list(self, entity_set: str, filter: str | None = None, extra: dict | None = None) -> list[dict]:
        params = dict(extra or {})
        if filter:
            params["$filter"] = filter
        url: str | None = f"{self.company_url}/{entity_set}" + (f"?{query_string(params)}" if params else "")
        found: list[dict] = []
        while url:
            response = await self.api.request("GET", url)
            body = response.body if isinstance(response.body, dict) else {}
            if not isinstance(body.get("value"), list):
                raise UpstreamError(self.api.service, response.status, "MalformedResponse",
                                    f"the {entity_set} list had no 'value'")
            found.extend(body["value"])
            url = body.get("@odata.nextLink")
        return found

    async def get(self, entity_set: str, entity_id: str, extra: dict | None = None) -> dict | None:
        try:
            query = f"?{query_string(extra)}" if extra else ""
            response = await self.api.request("GET", f"{self.company_url}/{entity_set}({entity_id}){query}")
        except UpstreamNotFound:
            return None
        return _entity(response.body)

    async def create(self, entity_set: str, fields: dict, send_by: float | None = None) -> dict:
        """POST. A lost answer raises `UpstreamAmbiguous`: look the record up before repeating."""
        response = await self.api.request("POST", f"{self.company_url}/{entity_set}", json_body=fields,
                                          idempotent=False, send_by=send_by)
        return _entity(response.body)

    async def update(self, entity_set: str, entity_id: str, etag: str, changes: dict) -> dict:
        response = await self.api.request("PATCH", f"{self.company_url}/{entity_set}({entity_id})",
                                          json_body=changes, headers={"If-Match": etag})
        return _entity(response.body)

    async def delete(self, entity_set: str, entity_id: str, etag: str) -> None:
        await self.api.request("DELETE", f"{self.company_url}/{entity_set}({entity_id})", headers={"If-Match": etag})

    async def batch(self, requests: list[dict], atomic: bool = False, idempotent: bool = True,
                    send_by: float | None = None) -> list[dict]:
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
        # BC does not say whether a `$batch` counts as one request or as each of its operations
        # toward its 6,000 per 5 minutes: the budget is charged for each (the strictest reading).
        response = await self.api.request("POST", self.batch_url, json_body=payload, headers=headers,
                                          idempotent=idempotent, send_by=send_by, cost=len(requests))
        answers = {str(item.get("id")): item for item in (response.body or {}).get("responses", [])}
        if len(answers) != len(requests):
            raise UpstreamError(self.api.service, response.status, "MalformedResponse",
                                "the batch answer did not cover every request")
        return [answers[str(index)] for index in range(len(requests))]

    # -- entities ------------------------------------------------------------------------------

    async def customers_by_emails(self, emails: list[str]) -> dict[str, list[dict]]:
        """Customers by e-mail, case-insensitively, also when their E-Mail holds a `;`-separated
        list with the address in it; keys are lower-case."""
        return await self._by_values(CUSTOMERS_BY_EMAIL, emails, lambda c: True)

    async def items_by_names(self, names: list[str]) -> dict[str, list[dict]]:
        """Service items by name, case-insensitively; keys are lower-case."""
        return await self._by_values(ITEMS_BY_NAME, names, lambda i: i.get("type") == "Service")

    async def _by_values(self, lookup: Lookup, values: list[str], keep) -> dict[str, list[dict]]:
        """Many values with few requests: `or` filters packed to BC's node limit
        (`shared/upstream/bc_lookups.py`), many of them in one `$batch` (one round trip, and one of BC's
        concurrent-request slots, instead of one each). Values BC cannot hold are answered "not
        found" without asking."""
        wanted = lookup.askable(values)
        found: dict[str, list[dict]] = {value: [] for value in {lookup.fold(v) for v in values if v and v.strip()}}
        seen: dict[str, set[str]] = {value: set() for value in found}
        queries = lookup.queries(wanted)
        if any(query.fallback for query in queries):
            verdict = await self.nested_calls()
            if verdict in ("refused", "untrusted"):
                log.warning("Business Central %s the nested lookup of %s with $schemaversion=2.1; asked without it",
                            verdict, lookup.entity_set,
                            extra={"event": "bc_lookup_fallback", "entity_set": lookup.entity_set, "verdict": verdict})
                queries = [fallback for query in queries for fallback in query.fallback or (query,)]
        for records in await self._ask(lookup.entity_set, queries):
            for record in records:
                for key in lookup.keys_of(record):
                    if key in found and keep(record) and record.get("id") not in seen[key]:
                        seen[key].add(record.get("id"))
                        found[key].append(record)
        return found

    async def nested_calls(self) -> str:
        """Whether BC's answer to the customer lookup's nested `contains(tolower(email),…)` (with
        `$schemaversion=2.1`) can be trusted. BC's docs say a nested call where it is not supported
        "either throws an error or returns an undefined result", and a 200 that silently finds
        nothing would make the directory create every customer again. So the lookup is tried once
        with the first address of a customer BC has: `trusted` when BC finds that customer by it
        and nothing that lacks the address; `refused` on a 400; `untrusted` on any other 200;
        `unknown` when BC has no customer with an e-mail to try (nothing can be missed then; kept a minute for that company). A
        verdict is kept `NESTED_CHECK_SECONDS` per environment."""
        cached = _nested_verdicts.get(self.api)
        if cached and cached[0] > time.monotonic():
            return cached[1]
        if _no_sample_until.get(self.api, {}).get(self.company_id, 0.0) > time.monotonic():
            return "unknown"
        sample = await self.list("customers", "email ne ''", {"$top": "1", "$select": "id,email"})
        addresses = email_addresses(sample[0].get("email")) if sample else []
        if not addresses:
            _no_sample_until.setdefault(self.api, {})[self.company_id] = time.monotonic() + NESTED_UNKNOWN_SECONDS
            return "unknown"
        address = addresses[0]
        try:
            found = await self.list("customers", f"contains(tolower(email),{odata_string(address)})",
                                    {"$top": "50", "$select": "id,email", **SCHEMA_2_1})
        except UpstreamError as error:
            if error.status != 400:
                raise
            verdict = "refused"
        else:
            trusted = any(r.get("id") == sample[0].get("id") for r in found) and all(
                address in (r.get("email") or "").lower() for r in found)
            verdict = "trusted" if trusted else "untrusted"
        _nested_verdicts[self.api] = (time.monotonic() + NESTED_CHECK_SECONDS, verdict)
        return verdict

    async def _ask(self, entity_set: str, queries: list[Query]) -> list[list[dict]]:
        """The records each query finds: one GET for a single query, else `$batch`es of 100. A
        query BC refuses that has a fallback is asked again as its fallback."""
        if not queries:
            return []
        answers: list[list[dict] | UpstreamError] = []
        if len(queries) == 1:
            answers.append(await self._list_or_refusal(entity_set, queries[0]))
        else:
            for start in range(0, len(queries), MAX_BATCH_REQUESTS):
                chunk = queries[start:start + MAX_BATCH_REQUESTS]
                replies = await self.batch([{"method": "GET", "url": q.url(entity_set)} for q in chunk])
                answers += [await self._list_answer(entity_set, q, reply) for q, reply in zip(chunk, replies, strict=True)]
        fallbacks = [fallback for query, answer in zip(queries, answers, strict=True)
                     if isinstance(answer, UpstreamError) for fallback in query.fallback]
        if fallbacks:
            log.warning("Business Central refused a lookup of %s with $schemaversion=2.1; asked without it",
                        entity_set, extra={"event": "bc_lookup_fallback", "entity_set": entity_set})
        return [a for a in answers if not isinstance(a, UpstreamError)] + await self._ask(entity_set, fallbacks)

    async def _list_or_refusal(self, entity_set: str, query: Query) -> list[dict] | UpstreamError:
        try:
            return await self.list(entity_set, query.filter, query.params)
        except UpstreamError as error:
            if query.fallback and error.status == 400:
                return error
            raise

    async def _list_answer(self, entity_set: str, query: Query, answer: dict) -> list[dict] | UpstreamError:
        """The records of one list answered inside a `$batch`; a failed or paged one is read
        again on its own (`list` retries and follows `nextLink`)."""
        body = answer.get("body")
        status = int(answer.get("status") or 0)
        if 200 <= status < 300 and isinstance(body, dict) and isinstance(body.get("value"), list) \
                and not body.get("@odata.nextLink"):
            return body["value"]
        if status == 400 and query.fallback:
            return error_from_body(self.api.service, status, body, "")
        return await self.list(entity_set, query.filter, query.params)

    async def create_many(self, entity_set: str, records: list[dict], send_by: float | None = None
                          ) -> list[dict | UpstreamError]:
        """Create records in `$batch`es sized by `creates_per_batch`. One answer per record, in
        order: the new record; `UpstreamAmbiguous` when BC may have created it or may still be
        creating it (the batch timed out or its answer was lost, or BC timed the request out);
        `UpstreamThrottled` when it was certainly not sent (throttled, past `send_by`, or a
        batch before it had an unknown outcome: no more load is put on a BC that is struggling),
        or an `UpstreamError` with status 503 (BC answered the batch "unavailable" to the end: not run);
        any other `UpstreamError` is BC's own answer for that record. `send_by`: see
        `ApiClient.request`."""
        if len(records) == 1:
            try:
                return [await self.create(entity_set, records[0], send_by)]
            except UpstreamError as error:
                return [error]
        size = creates_per_batch(entity_set, self.timeout_seconds)
        results: list[dict | UpstreamError] = []
        stopped: UpstreamError | None = None
        for start in range(0, len(records), size):
            chunk = records[start:start + size]
            if stopped is not None:
                results += [_not_sent(self.api.service, stopped)] * len(chunk)
                continue
            try:
                answers = await self.batch([{"method": "POST", "url": entity_set, "body": record} for record in chunk],
                                           idempotent=False, send_by=send_by)
            except UpstreamError as error:
                if not isinstance(error, (UpstreamAmbiguous, UpstreamThrottled)) and error.status not in NOT_RUN_STATUS:
                    raise
                results += [error] * len(chunk)
                stopped = error
                continue
            results += [self._created(answer) for answer in answers]
        return results

    def _created(self, answer: dict) -> dict | UpstreamError:
        status = int(answer.get("status") or 0)
        body = answer.get("body")
        if 200 <= status < 300 and isinstance(body, dict) and "id" in body:
            return body
        error = body.get("error", {}) if isinstance(body, dict) else {}
        refusal = error_from_body(self.api.service, status, body, str(error.get("message", "")))
        if status in UNKNOWN_OUTCOME_STATUS:
            return UpstreamAmbiguous(refusal.service, status, refusal.code, refusal.message)
        return refusal

    async def invoices_by_external_numbers(self, keys: list[str]) -> dict[str, list[dict]]:
        """Invoices by our deterministic external document numbers (few requests for many).
        `externalDocumentNumber` is a Code field: BC keeps it upper-case, and so do our keys."""
        found = await self._by_values(INVOICES_BY_KEY, keys, lambda i: True)
        return {key: found.get(key.strip().upper(), []) for key in keys}

    async def countries(self) -> list[dict]:
        """BC's Country/Region table (`code`, `displayName`): the only values `country` takes."""
        return await self.list("countriesRegions")

    async def dimensions(self, codes: list[str]) -> dict[str, dict]:
        """The dimensions of these codes (Code fields: upper-case) with their values, in one
        request: code → the dimension with `dimensionValues`. A code BC does not have is absent.
        (API v2.0 does not publish whether a dimension or a value is blocked.)"""
        wanted = sorted({code.strip().upper() for code in codes if code.strip()})
        if not wanted:
            return {}
        # Within BC's filter node limit like every lookup (a company rarely has more than a few codes).
        queries = pack([term(f"code eq {odata_string(code)}", code) for code in wanted])
        found = [record for query in queries
                 for record in await self.list("dimensions", query.filter, {"$expand": "dimensionValues"})]
        return {record.get("code"): record for record in found if record.get("code") in wanted}

    async def company(self) -> dict:
        """The configured company (reachable, and the app may read it)."""
        response = await self.api.request("GET", self.company_url)
        company = _entity(response.body)
        self._name = (time.monotonic() + COMPANY_NAME_SECONDS, company.get("name") or company["id"])
        return company

    async def name(self) -> str:
        """The company's name (what BC's web client opens it by), asked at most once an hour;
        its id when BC cannot be asked."""
        if self._name is None or self._name[0] < time.monotonic():
            try:
                await self.company()
            except UpstreamError:
                return self.company_id
        return self._name[1]

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


def _not_sent(service: str, cause: UpstreamError) -> UpstreamThrottled:
    return UpstreamThrottled(service, None, "NotSent", f"not sent: an earlier batch failed ({cause.code})")


def _entity(body: Any) -> dict:
    if not isinstance(body, dict) or "id" not in body:
        raise UpstreamError("Business Central", None, "MalformedResponse", "the answer had no record")
    return body
