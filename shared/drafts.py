"""Drafts made in steps: an invoice whose business carries invoice dimensions.

A sales line takes the header's dimension set when it is created, and a dimension set line
saved later changes only the header (BC assigns the header's Dimension Set ID; the lines keep
theirs). So such a draft is made header first (created like any other, found again by its
`externalDocumentNumber`), then its `dimensionSetLines`, then its lines, never the lines before
the dimensions. Each step is keyed, so repeating one is harmless: BC refuses a second dimension
set line for the same dimension ("already exists") and a second line of the same `sequence`
(`Internal_EntityWithSameKeyExists`), and both count as done. A draft left half made (a lost
answer, throttling, a crash) is completed by the part's next attempt, which finds the header by
its key and reads what it already has. A draft BC refuses a dimension or a line of is deleted,
so that no incomplete draft stays behind, and the part fails with what to fix."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from shared.bc import MAX_BATCH_REQUESTS, BcClient, Wait, explain_refusal
from shared.dimensions import clear_refusal, record_refusal
from shared.http import UpstreamError, error_from_body
from shared.messages import throttled_wait
from shared.store import Store

log = logging.getLogger(__name__)

LINE_STEP = 10_000
"""BC numbers lines 10000, 20000…: a draft made in steps gives its lines these numbers itself,
so a line sent twice is refused as a duplicate rather than added twice."""


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
    have_dimensions: dict[str, str] = field(default_factory=dict)
    have_lines: set[int] = field(default_factory=set)


async def complete(bc: BcClient, drafts: list[Draft]) -> None:
    """Give each draft its missing dimension set lines, then its missing lines. Sets `wait`
    (try again later) or `refusal` (BC refused, the draft was deleted) on the drafts that are not
    complete; the others get their `invoice` as BC has it now (number, totals)."""
    for draft in drafts:
        if not draft.new:
            await _read(bc, draft)
    todo = [d for d in drafts if d.refusal is None]
    await _send(bc, [(d, f"salesInvoices({d.invoice['id']})/dimensionSetLines", {"code": code, "valueCode": value})
                     for d in todo for code, value in sorted(d.dimensions.items()) if code not in d.have_dimensions],
                dimensions=True)
    todo = [d for d in todo if d.refusal is None and d.wait is None]
    await _send(bc, [(d, f"salesInvoices({d.invoice['id']})/salesInvoiceLines", line)
                     for d in todo for line in d.lines if line["sequence"] not in d.have_lines], dimensions=False)
    for draft in drafts:
        if draft.refusal is not None:
            await _delete(bc, draft)
    done = [d for d in drafts if d.refusal is None and d.wait is None]
    if done:
        try:
            current = await bc.invoices_by_id([d.invoice["id"] for d in done])
        except UpstreamError:
            current = {}
        for draft in done:
            draft.invoice = current.get(draft.invoice["id"]) or draft.invoice


async def _read(bc: BcClient, draft: Draft) -> None:
    try:
        found = await bc.get("salesInvoices", draft.invoice["id"], {"$expand": "dimensionSetLines,salesInvoiceLines"})
    except UpstreamError as error:
        draft.wait = _later(draft, error)
        return
    if found is None:
        draft.refusal = "the draft was deleted in Business Central while the app was making it"
        return
    draft.invoice = found
    draft.have_dimensions = {d.get("code"): d.get("valueCode") for d in found.get("dimensionSetLines") or []}
    draft.have_lines = {int(line.get("sequence") or 0) for line in found.get("salesInvoiceLines") or []}


async def _send(bc: BcClient, requests: list[tuple[Draft, str, dict]], dimensions: bool) -> None:
    """POST the requests in `$batch`es (each on its own: BC answers every one); judge each answer."""
    for start in range(0, len(requests), MAX_BATCH_REQUESTS):
        chunk = requests[start:start + MAX_BATCH_REQUESTS]
        try:
            answers = await bc.batch([{"method": "POST", "url": url, "body": body} for _, url, body in chunk])
        except UpstreamError as error:  # the whole batch: keyed, so it is simply sent again later
            for draft, _, _ in chunk:
                draft.wait = draft.wait or _later(draft, error)
            continue
        for (draft, _, body), answer in zip(chunk, answers, strict=True):
            status = int(answer.get("status") or 0)
            if 200 <= status < 300 or draft.refusal is not None:
                continue
            error = error_from_body(bc.api.service, status, answer.get("body"), "")
            if _duplicate(error, dimensions):
                continue
            if error.retryable:
                draft.wait = draft.wait or _later(draft, error)
            elif dimensions:
                draft.dimension_refusal = True
                draft.refusal = (f"Business Central refused the invoice dimension {body['code']}={body['valueCode']}: "
                                 f"{error.message} Fix: check INVOICE_DIMENSIONS and the dimension's values in "
                                 "Business Central (Dimensions → Dimension Values), then invoice these bookings again.")
            else:
                draft.refusal = explain_refusal(error.message)


def _duplicate(error: UpstreamError, dimensions: bool) -> bool:
    if dimensions:
        return "already exists" in error.message
    return error.code == "Internal_EntityWithSameKeyExists"


def _later(draft: Draft, error: UpstreamError) -> Wait:
    until = datetime.now(timezone.utc) + timedelta(seconds=throttled_wait(error))
    return Wait(until, draft.since, f"the draft is not complete yet ({error.code}); it is completed later",
                attempt=error.status is not None and error.status != 429)


async def _delete(bc: BcClient, draft: Draft) -> None:
    """No half-made draft stays in BC: it is deleted (with its ETag as BC has it now)."""
    try:
        current = await bc.get("salesInvoices", draft.invoice["id"])
        if current is not None:
            await bc.delete("salesInvoices", current["id"], current.get("@odata.etag", "*"))
        log.warning("incomplete draft %s deleted: %s", draft.invoice.get("number"), draft.refusal,
                    extra={"event": "draft_deleted", "invoice_id": draft.invoice["id"]})
    except UpstreamError as error:
        draft.refusal += (f" The incomplete draft {draft.invoice.get('number')} could not be deleted ({error.code}): "
                          "delete it in Business Central.")


async def complete_parts(store: Store, bc: BcClient, works: list, invoices: dict[str, dict],
                           refused: dict[str, str], claimed_at: datetime) -> None:
    """Complete the drafts of job parts (`shared.invoice_worker.PartWork`) with invoice dimensions.
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
