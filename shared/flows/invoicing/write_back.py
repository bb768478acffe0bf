"""Write-back (`WRITE_BACK_TO_BOOKINGS`): one marker line per invoice in the appointment's staff
notes, and what became of it, kept where people look.

Each appointment is read by id first (lists return notes empty), its text is kept and the line is
never added twice. Bookings may refuse the change: apps writing appointments with application
permissions "must follow the business rules validation" (minimum lead time, business hours), and
whether a change of the notes alone of an appointment that has already happened is exempt is not
documented; Bookings may also answer `UnknownError` without a reason. The invoice stands either
way: the marker is a note for staff, not the record of what was invoiced (that is this app's and
BC's).

So every booking's outcome is kept: on its job part (`WriteBack`: how many were noted, and each
one that was not, with why), shown in the job's JSON and page, and the latest write-back's in a
blob (`LATEST_BLOB`) that the status check `bookingsNotes` reads, so an operator learns from
`GET /api/status` that Bookings refuses the notes, not from a log."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone

from shared.upstream.graph import BookingsRefused, UnreadableAppointment
from shared.upstream.errors import UpstreamError, UpstreamNotFound
from shared.runtime import Runtime
from shared.storage.store import JOBS, Store, fit_string, to_json
from shared.upstream.utf16 import units

log = logging.getLogger(__name__)

MARKER = "Invoiced: Business Central draft invoice {number} ({date})"
NOTES_UNITS = 1000
"""The longest staff notes the write-back leaves behind, in UTF-16 units. Bookings documents no
limit; the simulator's strict choice (sandbox/graph/limits.py): notes that would grow past it are
left as they are (the invoice itself is made all the same)."""
LATEST_BLOB = "write-back/latest.json"
SHOWN = 50
"""Bookings not noted that a job part keeps (with why); the count covers them all."""

NOTED, REFUSED, FAILED, GONE, UNREADABLE, TOO_LONG = "noted", "refused", "failed", "gone", "unreadable", "too-long"
OUTCOMES = (NOTED, REFUSED, FAILED, GONE, UNREADABLE, TOO_LONG)


@dataclass(frozen=True)
class Outcome:
    booking_id: str
    outcome: str
    """One of `OUTCOMES`."""
    message: str = ""

    def as_dict(self) -> dict:
        return {"bookingId": self.booking_id, "outcome": self.outcome, "message": self.message}


def _refusal(error: UpstreamError) -> str:
    reason = error.message if error.message and error.message != "no reason given" else "no reason given"
    return (f"Bookings refused the change ({error.status} {error.code}: {reason}). Bookings' business rules for "
            "apps (minimum lead time, business hours) may refuse changes to appointments that have already happened.")


def classify(error: UpstreamError) -> str:
    """The outcome that an error of the read or the change means (a refusal of the app itself, 401
    or 403, is a failure to fix in its permissions, not a refusal of the note)."""
    if isinstance(error, UnreadableAppointment):
        return UNREADABLE
    if isinstance(error, UpstreamNotFound) and error.code != "ErrorFolderNotFound":
        return GONE
    if isinstance(error, BookingsRefused) or (not error.retryable and error.status not in (401, 403)):
        return REFUSED
    return FAILED


def _message(kind: str, error: UpstreamError) -> str:
    if kind == REFUSED:
        return _refusal(error)
    if kind == GONE:
        return "the appointment is no longer in Bookings"
    if kind == UNREADABLE:
        return f"the appointment could not be read: {error.message}"
    if error.status in (401, 403):
        return f"Bookings refused the app ({error.status} {error.code}): check its permission " \
               "BookingsAppointment.ReadWrite.All"
    return f"Bookings did not take the note ({error}); it was not written"


async def write_back(rt: Runtime, bookings: list, link: dict) -> list[Outcome]:
    """Add the invoice's marker line to each booking's appointment; the outcome of each."""
    line = MARKER.format(number=link["invoiceNumber"], date=link["date"])
    graph = rt.graph

    async def one(booking) -> Outcome:
        try:
            appointment = await graph.get_appointment(booking.business_id, booking.id)
            notes = appointment.service_notes or ""
            if line in notes.splitlines():
                return Outcome(booking.id, NOTED)
            updated = f"{notes.rstrip()}\n{line}" if notes.strip() else line
            if units(updated) > NOTES_UNITS:
                log.warning("the staff notes of an appointment are too long to add invoice %s to", link["invoiceNumber"],
                            extra={"event": "write_back_skipped", "booking_id": booking.id})
                return Outcome(booking.id, TOO_LONG, f"the staff notes are too long to add the line to (Bookings "
                                                     f"keeps {NOTES_UNITS} characters); they were left as they are")
            await graph.update_appointment(booking.business_id, booking.id, {"serviceNotes": updated})
            return Outcome(booking.id, NOTED)
        except UpstreamError as error:
            kind = classify(error)
            log.warning("could not note invoice %s on appointment: %s", link["invoiceNumber"], error,
                        extra={"event": "write_back_failed", "booking_id": booking.id, "outcome": kind,
                               "status": error.status, "code": error.code})
            return Outcome(booking.id, kind, _message(kind, error))

    return list(await asyncio.gather(*(one(b) for b in bookings)))


def summary(outcomes: list[Outcome]) -> dict:
    """What a job part keeps (`WriteBack`): how many were noted, and the first `SHOWN` that were not."""
    missed = [o for o in outcomes if o.outcome != NOTED]
    return {"noted": len(outcomes) - len(missed), "notNoted": [o.as_dict() for o in missed[:SHOWN]],
            "notNotedCount": len(missed)}


async def record(store: Store, row: dict, outcomes: list[Outcome], invoice_number: str | None) -> None:
    """Keep the outcomes on the job part and as the latest write-back (for the status check)."""
    kept = summary(outcomes)
    await store.update(JOBS, {"PartitionKey": row["PartitionKey"], "RowKey": row["RowKey"],
                              "WriteBack": fit_string(to_json(kept), 30_000)}, etag=None)
    latest = {"at": datetime.now(timezone.utc).isoformat(), "jobId": row["PartitionKey"],
              "invoiceNumber": invoice_number, "noted": kept["noted"], "notNoted": kept["notNotedCount"],
              "refused": sum(1 for o in outcomes if o.outcome == REFUSED),
              "example": kept["notNoted"][0] if kept["notNoted"] else None}
    await store.write_blob(LATEST_BLOB, json.dumps(latest).encode(), "application/json")


async def note_part(rt: Runtime, store: Store, row: dict, bookings: list, link: dict) -> None:
    """Write back one job part's invoice and keep what became of it. Never raises: the invoice
    is made and recorded whatever happens to its note."""
    outcomes = await write_back(rt, bookings, link)
    try:
        await record(store, row, outcomes, link.get("invoiceNumber"))
    except Exception:  # noqa: BLE001 - the notes' report is not worth failing an invoiced part for
        log.exception("the write-back of job part %s could not be recorded", row["RowKey"],
                      extra={"event": "write_back_unrecorded", "job_id": row["PartitionKey"]})


async def check(store: Store) -> dict:
    """The status check `bookingsNotes`: did Bookings take the latest write-back's notes?"""
    content = await store.read_blob(LATEST_BLOB)
    latest = json.loads(content) if content else None
    if not latest:
        return {"name": "bookingsNotes", "ok": True,
                "message": "WRITE_BACK_TO_BOOKINGS is on; no invoice has been noted in Bookings yet"}
    total = int(latest.get("noted") or 0) + int(latest.get("notNoted") or 0)
    if not latest.get("notNoted"):
        return {"name": "bookingsNotes", "ok": True, "message": f"the latest write-back noted {latest['noted']} "
                                                                f"booking(s) in Bookings (job {latest['jobId']})"}
    example = latest.get("example") or {}
    advice = (" If Bookings refuses every note (its business rules for apps), turn WRITE_BACK_TO_BOOKINGS off."
              if latest.get("refused") else "")
    return {"name": "bookingsNotes", "ok": True,
            "message": f"Warning: the latest write-back could not note {latest['notNoted']} of {total} invoiced "
                       f"booking(s) in Bookings (job {latest['jobId']}, invoice {latest.get('invoiceNumber') or '?'}; "
                       f"e.g. appointment {example.get('bookingId', '?')}: {example.get('message', '')}). The invoices "
                       f"were made; only the marker line in the appointments' staff notes is missing.{advice}"}
