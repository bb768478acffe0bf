"""What needs a person: bookings that cannot be invoiced (grouped by why), customers and items
Business Central refused, and messages that ended in a poison queue.

Everything here is read from the same places the API and the workers use (`candidates`, the link
tables, the `-poison` queues); nothing is computed a second way."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from shared.flows.directory.health import refusals
from shared.flows.invoicing.uninvoiced import REASON_CODES, Candidate, Filters, candidates
from shared.runtime import Runtime
from shared.storage.store import QUEUES, Store

SHOWN_PER_GROUP = 50


@dataclass
class ReasonGroup:
    code: str
    count: int = 0
    bookings: list[Candidate] = field(default_factory=list)


@dataclass
class Poisoned:
    queue: str
    reason: str
    failed_at: str | None
    attempts: int | None
    summary: str


@dataclass
class Attention:
    groups: list[ReasonGroup]
    refused: list[dict]
    poisoned: list[Poisoned]

    @property
    def empty(self) -> bool:
        return not (self.groups or self.refused or self.poisoned)


def group_by_reason(found: list[Candidate]) -> list[ReasonGroup]:
    groups: dict[str, ReasonGroup] = {}
    for candidate in found:
        if candidate.invoiceable:
            continue
        group = groups.setdefault(candidate.reason_code or "other", ReasonGroup(candidate.reason_code or "other"))
        group.count += 1
        if len(group.bookings) < SHOWN_PER_GROUP:
            group.bookings.append(candidate)
    order = {code: index for index, code in enumerate(REASON_CODES)}
    return sorted(groups.values(), key=lambda g: order.get(g.code, len(order)))


def _summary(message: object) -> str:
    """A line saying what the message was about (a job, a customer, a sync request)."""
    if not isinstance(message, dict):
        return str(message)[:200]
    if message.get("jobId"):
        return f"invoicing job {message['jobId']}"
    for key in ("email", "serviceId", "reason"):
        if message.get(key):
            return f"{key} {message[key]}"
    entries = message.get("customers") or message.get("items") or message.get("entries")
    if isinstance(entries, list):
        return f"{len(entries)} entries"
    return json.dumps(message)[:200]


async def poisoned(store: Store) -> list[Poisoned]:
    """Messages in every `<queue>-poison`, with the reason the app wrote when it gave up."""
    found = []
    texts = await asyncio.gather(*(store.peek(f"{queue}-poison") for queue in QUEUES))
    for queue, messages in zip(QUEUES, texts, strict=True):
        for text in messages:
            try:
                body = json.loads(text)
            except ValueError:
                body = {"reason": "not readable", "message": text}
            if not isinstance(body, dict):
                body = {"message": body}
            found.append(Poisoned(queue, str(body.get("reason") or "no reason recorded"), body.get("failedAt"),
                                  body.get("dequeueCount"), _summary(body.get("message"))))
    return found


async def needs_attention(rt: Runtime, store: Store) -> Attention:
    found, refused, poison = await asyncio.gather(candidates(rt, store, Filters()), refusals(store, rt.settings), poisoned(store))
    return Attention(group_by_reason(found), refused, poison)
