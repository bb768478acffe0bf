"""Drafts made in steps: an invoice whose business carries invoice dimensions.

A sales line takes the header's dimension set when it is created, and a dimension set line
saved later changes only the header (BC assigns the header's Dimension Set ID; the lines keep
theirs). So such a draft is made header first (created like any other, found again by its
`externalDocumentNumber`), then its `dimensionSetLines`, then its lines, never the lines before
the dimensions. BC may give a new header dimensions of its own (the default dimensions of the
customer, its salesperson or location) and a line those of its item; the draft must carry
exactly the configured values all the same, so a dimension BC already has with another value is
changed (PATCH with `If-Match`), and once the lines exist the draft is read back with every
line's dimensions (one multi-level `$expand`, which also gives the final number and totals) and
any line BC gave another value is changed too.

Each step is keyed (a dimension by its code, a line by the `sequence` the app gives it), so
repeating one never adds a second: BC refuses it. Whether a refused or unanswered write is in
fact there is never guessed from the error: the draft is read, and what it holds decides. A
draft left half made (a lost answer, throttling, a crash) is completed by the part's next
attempt, which finds the header by its key and reads what it already has. A draft BC refuses a
dimension or a line of is deleted, so that no incomplete draft stays behind, and the part fails
with what to fix; a draft found complete is never deleted."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TypeVar
from urllib.parse import quote, urlencode

from shared.upstream.bc import CONFIRM_DELAYS, MAX_BATCH_REQUESTS, BcClient, Wait, explain_refusal
from shared.flows.invoicing.dimensions import clear_refusal, record_refusal
from shared.upstream.errors import UpstreamAmbiguous, UpstreamError, error_from_body
from shared.flows.messages import throttled_wait
from shared.storage.store import Store

T = TypeVar("T")

log = logging.getLogger(__name__)

LINE_STEP = 10_000
"""BC numbers lines 10000, 20000…: a draft made in steps gives its lines these numbers itself,
so a line sent twice is refused rather than added twice."""
ROUNDS = 3
"""Rounds of dimension writes per step: a POST BC refuses because the dimension is already there
(a default dimension) becomes a PATCH in the next round; a PATCH whose ETag went stale is sent
again with the one read."""
READ_DRAFT = {"$expand": "dimensionSetLines,salesInvoiceLines"}
VERIFY_DRAFT = {"$expand": "dimensionSetLines,salesInvoiceLines($expand=dimensionSetLines)"}


def numbered(lines: list[dict]) -> list[dict]:
    return [{**line, "sequence": LINE_STEP * (index + 1)} for index, line in enumerate(lines)]


@dataclass
class Draft:
    """One draft to complete: its key, BC's invoice, the wanted dimension values and lines."""
    key: str
    invoice: dict
    dimensions: dict[str, str]
    lines: list[dict]
    new: bool
    """Created by this attempt: it has nothing yet, so nothing needs reading."""
    since: datetime | None = None
    wait: Wait | None = None
    refusal: str | None = None
    dimension_refusal: bool = False
    have_dimensions: dict[str, dict] = field(default_factory=dict)
    """The header's dimension set lines as BC has them, by code."""
    have_lines: dict[int, dict] = field(default_factory=dict)
    """The draft's lines as BC has them, by sequence."""

    @property
    def ok(self) -> bool:
        return self.refusal is None and self.wait is None

    @property
    def path(self) -> str:
        return f"salesInvoices({self.invoice['id']})"

    def take(self, found: dict) -> None:
        """What BC holds of this draft now (a read with its lines and dimension set lines)."""
        self.invoice = {k: v for k, v in found.items() if k not in ("dimensionSetLines", "salesInvoiceLines")}
        self.have_dimensions = _by_code(found.get("dimensionSetLines"))
        self.have_lines = {int(line.get("sequence") or 0): line for line in found.get("salesInvoiceLines") or []}

    def refuse_dimension(self, code: str, value: str, message: str) -> None:
        self.dimension_refusal = True
        self.refusal = (f"Business Central refused the invoice dimension {code}={value}: {message} Fix: check "
                        "INVOICE_DIMENSIONS, the dimension's values and the default dimensions of the customer and "
                        "item in Business Central (Dimensions → Dimension Values, Default Dimensions), then invoice "
                        "these bookings again.")


@dataclass
class Parent:
    """What carries dimension set lines: a draft's header, or one of its lines."""
    draft: Draft
    path: str
    have: dict[str, dict]
    name: str = "the invoice"


def _by_code(lines: list[dict] | None) -> dict[str, dict]:
    return {str(line.get("code")): line for line in lines or []}


async def complete(bc: BcClient, drafts: list[Draft]) -> None:
    """Give each draft its missing or different dimension values, then its missing lines, then
    check every line's values. Sets `wait` (try again later) or `refusal` (BC refused, the draft
    was deleted) on the drafts that are not complete; the others get their `invoice` as BC has
    it now (number, totals)."""
    await _read(bc, [d for d in drafts if not d.new], READ_DRAFT)
    await _align(bc, [Parent(d, d.path, d.have_dimensions) for d in drafts if d.ok])
    await _add_lines(bc, [d for d in drafts if d.ok])
    await _verify(bc, [d for d in drafts if d.ok])
    for draft in drafts:
        if draft.refusal is not None:
            await _delete(bc, draft)


async def _get_each(bc: BcClient, items: list[T], url_of: Callable[[T], str],
                    draft_of: Callable[[T], Draft]) -> AsyncIterator[tuple[T, dict]]:
    """GETs in `$batch`es of 100 (BC answers every one): each item with its answer. When a whole
    batch fails, its items' drafts wait."""
    for start in range(0, len(items), MAX_BATCH_REQUESTS):
        chunk = items[start:start + MAX_BATCH_REQUESTS]
        try:
            answers = await bc.batch([{"method": "GET", "url": url_of(item)} for item in chunk])
        except UpstreamError as error:
            for item in chunk:
                draft = draft_of(item)
                draft.wait = draft.wait or _later(draft, error)
            continue
        for pair in zip(chunk, answers, strict=True):
            yield pair


async def _read(bc: BcClient, drafts: list[Draft], params: dict) -> dict[str, dict]:
    """Each draft as BC has it now (one `$batch` of GETs per 100). A draft BC no longer has is
    refused; one that cannot be read now waits. Returns the answers by draft key."""
    found: dict[str, dict] = {}
    query = urlencode(params, quote_via=quote, safe="$,()=")
    async for draft, answer in _get_each(bc, drafts, lambda d: f"{d.path}?{query}", lambda d: d):
        status, body = int(answer.get("status") or 0), answer.get("body")
        if status == 404:
            draft.refusal = "the draft was deleted in Business Central while the app was making it"
        elif 200 <= status < 300 and isinstance(body, dict) and "id" in body:
            draft.take(body)
            found[draft.key] = body
        else:
            draft.wait = draft.wait or _later(draft, error_from_body(bc.api.service, status, body, ""))
    return found


async def _send(bc: BcClient, requests: list[tuple[Draft, dict]]) -> list[tuple[dict | UpstreamError, dict] | None]:
    """The requests in `$batch`es of 100 (BC answers every one). Per request: (its answer body, or
    BC's refusal of it; the request), or None when the whole batch failed (its drafts then wait:
    what landed is read on the next attempt, never sent blindly again)."""
    results: list[tuple[dict | UpstreamError, dict] | None] = []
    for start in range(0, len(requests), MAX_BATCH_REQUESTS):
        chunk = requests[start:start + MAX_BATCH_REQUESTS]
        try:
            answers = await bc.batch([request for _, request in chunk], idempotent=False)
        except UpstreamError as error:
            for draft, _ in chunk:
                draft.wait = draft.wait or _later(draft, error)
            results += [None] * len(chunk)
            continue
        for (draft, request), answer in zip(chunk, answers, strict=True):
            status, body = int(answer.get("status") or 0), answer.get("body")
            if 200 <= status < 300:
                results.append((body if isinstance(body, dict) else {}, request))
                continue
            error = error_from_body(bc.api.service, status, body, "")
            if error.retryable:  # throttled or failed inside the batch: the next attempt reads and sends it
                draft.wait = draft.wait or _later(draft, error)
                results.append(None)
            else:
                results.append((error, request))
    return results


async def _align(bc: BcClient, parents: list[Parent]) -> None:
    """Make each parent carry its draft's dimension values: a missing one is POSTed, one with
    another value PATCHed (with its ETag, one per parent and round, since each changes the
    parent's ETag). A refused write is judged by what a read of the parent then shows."""
    for _ in range(ROUNDS):
        planned: list[tuple[Parent, str, str, dict]] = []
        for parent in [p for p in parents if p.draft.ok]:
            patched = False
            for code, value in sorted(parent.draft.dimensions.items()):
                have = parent.have.get(code)
                if have is None:
                    planned.append((parent, code, "POST", {"method": "POST", "url": f"{parent.path}/dimensionSetLines",
                                                           "body": {"code": code, "valueCode": value}}))
                elif have.get("valueCode") != value and not patched:
                    patched = True
                    planned.append((parent, code, "PATCH", {
                        "method": "PATCH", "url": f"{parent.path}/dimensionSetLines({have.get('id')})",
                        "headers": {"If-Match": have.get("@odata.etag") or "*"}, "body": {"valueCode": value}}))
        if not planned:
            return
        results = await _send(bc, [(parent.draft, request) for parent, _, _, request in planned])
        refused: list[tuple[Parent, str, str, UpstreamError, str | None]] = []
        for (parent, code, method, _), result in zip(planned, results, strict=True):
            if result is None:
                continue
            answer, _ = result
            if isinstance(answer, UpstreamError):
                refused.append((parent, code, method, answer, (parent.have.get(code) or {}).get("@odata.etag")))
            else:
                parent.have[code] = answer
        if not refused:
            continue
        await _reread(bc, list({id(p): p for p, *_ in refused}.values()))
        for parent, code, method, error, sent_etag in refused:
            if not parent.draft.ok:
                continue
            value = parent.draft.dimensions[code]
            have = parent.have.get(code)
            if have is not None and have.get("valueCode") == value:
                continue  # it is there after all (an earlier, unanswered write)
            if have is not None and (method == "POST" or have.get("@odata.etag") != sent_etag):
                continue  # BC had it with another value, or it changed meanwhile: PATCHed next round
            parent.draft.refuse_dimension(code, value, error.message)
    for parent in [p for p in parents if p.draft.ok]:
        for code, value in sorted(parent.draft.dimensions.items()):
            have = (parent.have.get(code) or {}).get("valueCode")
            if have != value:
                parent.draft.refuse_dimension(code, value, f"{parent.name} kept {code}={have or 'nothing'}.")
                break


async def _reread(bc: BcClient, parents: list[Parent]) -> None:
    """The dimension set lines of these parents as BC has them now."""
    async for parent, answer in _get_each(bc, parents, lambda p: f"{p.path}/dimensionSetLines", lambda p: p.draft):
        body = answer.get("body")
        if 200 <= int(answer.get("status") or 0) < 300 and isinstance(body, dict):
            parent.have.clear()
            parent.have.update(_by_code(body.get("value")))
        else:
            error = error_from_body(bc.api.service, int(answer.get("status") or 0), body, "")
            parent.draft.wait = parent.draft.wait or _later(parent.draft, error)


async def _add_lines(bc: BcClient, drafts: list[Draft]) -> None:
    """POST the lines BC does not have yet. A refused line is looked for in the draft before the
    refusal counts: a line of that `sequence` is the one sent earlier whose answer was lost."""
    requests = [(d, {"method": "POST", "url": f"{d.path}/salesInvoiceLines", "body": line})
                for d in drafts for line in d.lines if line["sequence"] not in d.have_lines]
    if not requests:
        return
    refused: dict[str, list[tuple[int, UpstreamError]]] = {}
    by_key = {d.key: d for d in drafts}
    for (draft, request), result in zip(requests, await _send(bc, requests), strict=True):
        if result is None:
            continue
        answer, _ = result
        sequence = request["body"]["sequence"]
        if isinstance(answer, UpstreamError):
            refused.setdefault(draft.key, []).append((sequence, answer))
        else:
            draft.have_lines[sequence] = answer
    await _read(bc, [by_key[key] for key in refused if by_key[key].ok], READ_DRAFT)
    for key, failures in refused.items():
        draft = by_key[key]
        missing = [error for sequence, error in failures if sequence not in draft.have_lines]
        if draft.ok and missing:
            draft.refusal = explain_refusal(missing[0].message)


async def _verify(bc: BcClient, drafts: list[Draft]) -> None:
    """Read each draft back with every line's dimension set lines (one request per 100 drafts,
    which also gives the draft's final number and totals), and give any line BC set another value
    (an item's default dimension) the configured one."""
    found = await _read(bc, drafts, VERIFY_DRAFT)
    parents = []
    for draft in [d for d in drafts if d.ok and d.key in found]:
        missing = [line["sequence"] for line in draft.lines if line["sequence"] not in draft.have_lines]
        if missing:  # a user deleted a line meanwhile: the next attempt adds it again
            draft.wait = Wait(datetime.now(timezone.utc), draft.since, "a line of the draft is missing in Business "
                              "Central; it is added again", attempt=True)
            continue
        parents.append(Parent(draft, draft.path, draft.have_dimensions))
        for line in found[draft.key].get("salesInvoiceLines") or []:
            if line.get("lineType") != "Comment":
                parents.append(Parent(draft, f"{draft.path}/salesInvoiceLines({line.get('id')})",
                                      _by_code(line.get("dimensionSetLines")), f"line {line.get('sequence')}"))
    await _align(bc, parents)


def _later(draft: Draft, error: UpstreamError) -> Wait:
    """When to try a draft again: soon after an unknown outcome (what landed is read then),
    after the service's delay otherwise."""
    seconds = CONFIRM_DELAYS[0] if isinstance(error, UpstreamAmbiguous) else throttled_wait(error)
    until = datetime.now(timezone.utc) + timedelta(seconds=seconds)
    return Wait(until, draft.since, f"the draft is not complete yet ({error.code}); it is completed later",
                attempt=isinstance(error, UpstreamAmbiguous) or (error.status is not None and error.status != 429))


def _is_complete(draft: Draft, found: dict) -> bool:
    """Whether BC's draft holds every wanted line and carries the wanted values on its header and
    on every line that is not a comment."""
    lines = {int(line.get("sequence") or 0): line for line in found.get("salesInvoiceLines") or []}
    if any(line["sequence"] not in lines for line in draft.lines):
        return False
    carriers = [found] + [line for line in lines.values() if line.get("lineType") != "Comment"]
    return all((_by_code(c.get("dimensionSetLines")).get(code) or {}).get("valueCode") == value
               for c in carriers for code, value in draft.dimensions.items())


async def _delete(bc: BcClient, draft: Draft) -> None:
    """No half-made draft stays in BC: it is deleted (with its ETag as BC has it now). A draft
    that turns out complete is kept, whatever was refused on the way."""
    try:
        current = await bc.get("salesInvoices", draft.invoice["id"], VERIFY_DRAFT)
        if current is not None and _is_complete(draft, current):
            log.warning("draft %s is complete after all: kept (%s)", draft.invoice.get("number"), draft.refusal,
                        extra={"event": "draft_kept", "invoice_id": draft.invoice["id"]})
            draft.take(current)
            draft.refusal, draft.dimension_refusal = None, False
            return
        if current is not None:
            await bc.delete("salesInvoices", current["id"], current.get("@odata.etag", "*"))
        log.warning("incomplete draft %s deleted: %s", draft.invoice.get("number"), draft.refusal,
                    extra={"event": "draft_deleted", "invoice_id": draft.invoice["id"]})
    except UpstreamError as error:
        draft.refusal += (f" The incomplete draft {draft.invoice.get('number')} could not be deleted ({error.code}): "
                          "delete it in Business Central.")


async def complete_parts(store: Store, bc: BcClient, works: list, invoices: dict[str, dict],
                         refused: dict[str, str], claimed_at: datetime) -> None:
    """Complete the drafts of job parts (`shared.flows.invoicing.parts.PartWork`) with invoice dimensions.
    A draft that must wait leaves `invoices` (the part gets `wait`); one BC refused leaves it too
    and is in `refused` (a refused dimension is recorded for the health checks); a complete one
    is in `invoices` as BC has it now."""
    if not works:
        return
    drafts = [Draft(w.key, invoices[w.key], w.dimensions, w.all_lines, new=w.key in invoices and w.earlier is None,
                    since=w.earlier or claimed_at) for w in works]
    await complete(bc, drafts)
    by_key = {w.key: w for w in works}
    for draft in drafts:
        work = by_key[draft.key]
        if draft.refusal is not None:
            del invoices[draft.key]
            refused[draft.key] = draft.refusal
            if draft.dimension_refusal:
                await record_refusal(store, bc.company_id, draft.dimensions, draft.refusal)
        elif draft.wait is not None:
            del invoices[draft.key]
            work.wait = draft.wait
        else:
            invoices[draft.key] = draft.invoice
            await clear_refusal(store, bc.company_id, draft.dimensions)
