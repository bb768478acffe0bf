"""Queue message schemas, and what happens to a message that cannot be processed.

A message that can never succeed (it does not parse, or names a template that does not exist)
goes to `<queue>-poison` at once. One that keeps failing is retried by the host until its last
allowed attempt (`maxDequeueCount`); then the app records why, lets the domain undo its claims,
and moves it to the poison queue itself. Either way the poison message says why, in words:
`{"reason", "queue", "dequeueCount", "failedAt", "message"}`."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from datetime import datetime, timezone
from typing import Annotated, Literal, TypeVar, Union
from collections.abc import Awaitable, Callable

import azure.functions as func
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from shared.hostconfig import queue_settings
from shared.upstream.errors import UpstreamThrottled

log = logging.getLogger(__name__)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class SyncRequest(Message):
    kind: Literal["sync"] = "sync"
    reason: str = Field("requested", max_length=200)
    requested_at: AwareDatetime | None = Field(None, alias="requestedAt")


class BusinessSync(Message):
    """One business's part of a sync run: the run fans out one of these per business, and any
    instance may take it (`shared.flows.sync.run.sync_business`)."""
    kind: Literal["business"] = "business"
    run_id: str = Field(alias="runId", min_length=1, max_length=64)
    business_id: str = Field(alias="businessId", min_length=1, max_length=320)
    trigger: str = Field("timer", max_length=220)
    requested_at: AwareDatetime = Field(alias="requestedAt")


class InvoiceReconciliation(Message):
    """A sync run's check of the drafts it knows against Business Central (`shared.flows.invoicing.reconcile`)."""
    kind: Literal["reconcile"] = "reconcile"
    run_id: str = Field(alias="runId", min_length=1, max_length=64)


sync_part = TypeAdapter(Annotated[Union[BusinessSync, InvoiceReconciliation], Field(discriminator="kind")])


SOURCE_TEXT = 200
"""Bookings text as it came (clipped only to keep messages small): the directory decides what
BC can take (`shared.flows.directory.customer_fields`), so nothing is cut to BC's lengths on the way."""


class CustomerSource(Message):
    """A Bookings customer as the directory upsert needs it (e-mail already normalised)."""
    email: str = Field(min_length=3, max_length=254, pattern=r"^[^@\s]+@[^@\s]+$")
    display_name: str | None = Field(None, alias="displayName", max_length=SOURCE_TEXT)
    phone: str | None = Field(None, max_length=SOURCE_TEXT)
    address_line1: str | None = Field(None, alias="addressLine1", max_length=SOURCE_TEXT)
    city: str | None = Field(None, max_length=SOURCE_TEXT)
    state: str | None = Field(None, max_length=SOURCE_TEXT)
    country: str | None = Field(None, max_length=SOURCE_TEXT)
    postal_code: str | None = Field(None, alias="postalCode", max_length=SOURCE_TEXT)
    business_id: str | None = Field(None, alias="businessId", max_length=320)


class ServiceSource(Message):
    service_id: str = Field(alias="serviceId", min_length=1, max_length=200)
    business_id: str | None = Field(None, alias="businessId", max_length=320)
    display_name: str = Field(alias="displayName", min_length=1, max_length=100)
    default_price: float = Field(0.0, alias="defaultPrice", ge=0, le=1e12)
    default_price_type: str | None = Field(None, alias="defaultPriceType", max_length=40)


def source_hash(source: CustomerSource | ServiceSource) -> str:
    """What a link row records of the data last upserted (`SourceHash`): the digest of the data,
    and the business it came from (`<digest>|<business>`), so a customer several businesses know
    is kept from one of them, and the same data from another business is no change."""
    digest = hashlib.sha256(encode(source.model_copy(update={"business_id": None})).encode()).hexdigest()[:32]
    return f"{digest}|{source.business_id}"


def source_business(recorded: str | None) -> str | None:
    """The business a link row's `SourceHash` (`<digest>|<business>`) came from."""
    return recorded.split("|", 1)[1] if recorded and "|" in recorded else None


def same_source_data(recorded: str | None, incoming: str) -> bool:
    """Whether two `SourceHash`es are of the same data (whichever business it came from)."""
    return recorded is not None and recorded.split("|", 1)[0] == incoming.split("|", 1)[0]


def kept_by_an_earlier_business(recorded: str | None, incoming: str, businesses: list[str]) -> bool:
    """Whether the record was last written from a business that comes before the incoming
    data's in `BOOKINGS_BUSINESS_IDS`: that business keeps it, so two businesses that know one
    customer differently never undo each other's data."""
    rank = {business: index for index, business in enumerate(businesses)}
    owner, source = source_business(recorded), source_business(incoming)
    return owner in rank and rank[owner] < rank.get(source, len(rank))


THROTTLED_DEFER_SECONDS = 60.0
"""How long work waits after an API kept throttling it without saying for how long."""


NOT_SENT_CODES = {"SendWindowPassed", "NotSent"}
"""Held back by the client itself (its send window passed; an earlier batch's outcome is unknown)."""


def throttled_wait(error: Exception) -> float:
    """Seconds to wait before trying again what `error` held back: its `Retry-After`, at least
    `THROTTLED_DEFER_SECONDS` (a retry sooner would only meet the same throttling); what the
    client held back itself goes again at once."""
    if getattr(error, "code", None) in NOT_SENT_CODES:
        return getattr(error, "retry_after", None) or 0.0
    return max(getattr(error, "retry_after", None) or 0.0, THROTTLED_DEFER_SECONDS)

UPSERT_BATCH = 100
"""Customers/services per message at most: one BC `$batch` (≤ 100) creates them all."""
MESSAGE_TEXT_LIMIT = 45_000
"""Characters of JSON per message: base64 makes it 60 KB, within the 64 KB queue limit."""


class CustomerUpsert(Message):
    kind: Literal["customer"] = "customer"
    customer: CustomerSource
    source_hash: str = Field(alias="sourceHash", max_length=400, description="`<digest>|<business>`")

    def entries(self) -> list[tuple[CustomerSource, str]]:
        return [(self.customer, self.source_hash)]


class ItemUpsert(Message):
    kind: Literal["item"] = "item"
    service: ServiceSource
    source_hash: str = Field(alias="sourceHash", max_length=400, description="`<digest>|<business>`")

    def entries(self) -> list[tuple[ServiceSource, str]]:
        return [(self.service, self.source_hash)]


class CustomerBatchUpsert(Message):
    kind: Literal["customers"] = "customers"
    customers: list[CustomerUpsert] = Field(min_length=1, max_length=UPSERT_BATCH)

    def entries(self) -> list[tuple[CustomerSource, str]]:
        return [(entry.customer, entry.source_hash) for entry in self.customers]


class ItemBatchUpsert(Message):
    kind: Literal["items"] = "items"
    services: list[ItemUpsert] = Field(min_length=1, max_length=UPSERT_BATCH)

    def entries(self) -> list[tuple[ServiceSource, str]]:
        return [(entry.service, entry.source_hash) for entry in self.services]


DirectoryUpsertMessage = Union[CustomerUpsert, ItemUpsert, CustomerBatchUpsert, ItemBatchUpsert]
DirectoryUpsert = Annotated[DirectoryUpsertMessage, Field(discriminator="kind")]
directory_upsert = TypeAdapter(DirectoryUpsert)


PARTS_PER_MESSAGE = 50


class InvoiceJobPart(Message):
    """Parts (customer groups) of an invoicing job, each one BC draft invoice; a message carries
    up to 50 so their BC round trips can be shared."""
    kind: Literal["invoice"] = "invoice"
    job_id: str = Field(alias="jobId", pattern=r"^[0-9a-f]{32}$")
    part: int | None = Field(None, ge=0, le=100_000)
    parts: list[Annotated[int, Field(ge=0, le=100_000)]] = Field(default_factory=list, max_length=PARTS_PER_MESSAGE)

    @model_validator(mode="after")
    def _some_part(self):
        if self.part is None and not self.parts:
            raise ValueError("name the job's part or parts")
        return self

    def part_indexes(self) -> list[int]:
        return sorted(set(self.parts) | ({self.part} if self.part is not None else set()))


class PermanentFailure(Exception):
    """Retrying cannot help (bad message, missing template…): poison it now, with this reason."""


MAX_DEFER_SECONDS = 7 * 24 * 3600
"""Azure Queue Storage keeps a message invisible for at most 7 days."""
DEFER_MARGIN_SECONDS = 0.5
"""Visibility is whole seconds: deferred work comes back just after its time, never before (if it
did, it would only wait again)."""


class Deferred(Exception):
    """The work cannot go on now but can later: Business Central may still be finishing an
    earlier request whose answer was lost, or the API is throttling. The message is queued again,
    visible after `seconds` (as `message`, when only part of it is left), and this attempt ends
    successfully: waiting never counts towards `maxDequeueCount`, so it never ends in poison."""

    def __init__(self, seconds: float, reason: str, message: BaseModel | None = None):
        super().__init__(reason)
        self.seconds, self.reason, self.message = seconds, reason, message


M = TypeVar("M")


def encode(message: BaseModel) -> str:
    return message.model_dump_json(by_alias=True, exclude_none=True)


def pack(entries: list[BaseModel], wrap) -> list[str]:
    """Encoded `wrap(chunk)` messages of up to `UPSERT_BATCH` entries and `MESSAGE_TEXT_LIMIT`
    characters each (entries are small; a chunk is closed before it would grow too large)."""
    messages, chunk, size = [], [], 0
    for entry in entries:
        length = len(encode(entry)) + 1
        if chunk and (len(chunk) == UPSERT_BATCH or size + length > MESSAGE_TEXT_LIMIT - 200):
            messages.append(encode(wrap(chunk)))
            chunk, size = [], 0
        chunk.append(entry)
        size += length
    if chunk:
        messages.append(encode(wrap(chunk)))
    return messages


async def process_message(message: func.QueueMessage, queue: str, schema: TypeAdapter | type[BaseModel],
                          handle: Callable[[M], Awaitable[None]],
                          give_up: Callable[[M, str], Awaitable[None]] | None = None,
                          poison: Callable[[str, str], Awaitable[None]] | None = None,
                          later: Callable[[str, str, int], Awaitable[None]] | None = None) -> None:
    """Parse, handle, and on a final failure record the reason and move the message to poison.

    `poison(queue, body)` sends to `<queue>-poison`; `give_up(parsed, reason)` lets the domain
    release what the message held (claims, "creating" markers); `later(queue, body, seconds)`
    queues a `Deferred` message again. An API still throttling after every retry defers the
    message too, by its `Retry-After` or a minute."""
    raw = message.get_body().decode("utf-8", errors="replace")
    attempt = message.dequeue_count or 1
    try:
        adapter = schema if isinstance(schema, TypeAdapter) else TypeAdapter(schema)
        parsed = adapter.validate_json(raw)
    except ValidationError as error:
        await _poison(poison, queue, raw, attempt, f"the message is not a valid {queue} message: "
                      + "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors()[:5]))
        return
    try:
        try:
            await handle(parsed)
        except UpstreamThrottled as error:
            raise Deferred(throttled_wait(error), str(error)) from error
        return
    except Deferred as deferred:
        if later is None:
            raise
        await _defer(later, queue, raw, deferred)
        return
    except PermanentFailure as error:
        reason = str(error)
    except Exception as error:  # noqa: BLE001 - any failure is retried by the host, then poisoned
        if attempt < queue_settings().max_dequeue_count:
            log.warning("attempt %d of a %s message failed, will retry: %s", attempt, queue, error,
                        extra={"event": "message_retry", "queue": queue, "attempt": attempt})
            raise
        reason = f"failed {attempt} times; last error: {error}"
    try:
        if give_up:
            await give_up(parsed, reason)
    except Exception as error:  # noqa: BLE001 - the reason must reach the poison queue regardless
        reason = f"{reason}; undoing its work also failed: {error}"
        log.exception("giving up on a %s message failed", queue, extra={"event": "give_up_failed", "queue": queue})
    await _poison(poison, queue, raw, attempt, reason)


async def _defer(later, queue: str, raw: str, deferred: Deferred) -> None:
    body = encode(deferred.message) if deferred.message is not None else raw
    seconds = int(min(max(math.ceil(deferred.seconds + DEFER_MARGIN_SECONDS), 1), MAX_DEFER_SECONDS))
    log.info("a %s message waits %d s: %s", queue, seconds, deferred.reason,
             extra={"event": "message_deferred", "queue": queue, "delay_seconds": seconds})
    await later(queue, body, seconds)


async def _poison(poison, queue: str, raw: str, attempt: int, reason: str) -> None:
    try:
        original = json.loads(raw)
    except ValueError:
        original = raw[:20_000]
    body = json.dumps({"reason": reason, "queue": queue, "dequeueCount": attempt,
                       "failedAt": datetime.now(timezone.utc).isoformat(), "message": original})
    log.error("moved a %s message to %s-poison: %s", queue, queue, reason,
              extra={"event": "message_poisoned", "queue": queue, "reason": reason})
    if poison is None:
        raise PermanentFailure(reason)
    await poison(queue, body)
