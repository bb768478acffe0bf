"""Write-back (`WRITE_BACK_TO_BOOKINGS`): the invoice's marker line in the appointment's staff
notes, under both readings of Bookings' business rules for app-only writes, and what people see
when Bookings does not take it: the invoice stands, and the job, its page and the status say so."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.helpers import body
from tests.signin_helpers import Browser
from tests.test_invoicing import appointment, run_job

def notes_check(world) -> dict:
    status = body(world.host.http("GET", "status"))
    return next(check for check in status["checks"] if check["name"] == "bookingsNotes")


def appointment_patches(world) -> int:
    return sum(count for shape, count in world.graph.plan.stats.requests.items()
               if shape.startswith("PATCH ") and shape.endswith("/appointments/{id}"))


@pytest.mark.parametrize("style", ["precise", "unknown-400", "unknown-500"])
def test_a_write_back_bookings_refuses_is_reported_and_the_invoice_stands(world, style):
    # The strictest reading (the simulator's default): an app may not change an appointment that
    # has already happened, and Bookings may say so without a reason.
    world.graph.configure(refusal_style=style)
    world.configure(WRITE_BACK_TO_BOOKINGS="true")
    a = appointment(world)
    world.graph.update_appointment(world.business_ids[0], a, serviceNotes="Prefers mornings.")
    world.sync()
    world.graph.plan.reset_stats()

    job = run_job(world, {"bookingIds": [a]})

    [invoice] = job["invoices"]
    assert job["status"] == "succeeded" and len(world.bc.invoices(world.company_id)) == 1, "the invoice stands"
    assert world.graph.appointment(world.business_ids[0], a)["serviceNotes"] == "Prefers mornings."
    [missed] = invoice["writeBack"]["notNoted"]
    assert invoice["writeBack"]["noted"] == 0 and (missed["bookingId"], missed["outcome"]) == (a, "refused")
    assert "Bookings refused the change" in missed["message"] and "business rules" in missed["message"]
    assert appointment_patches(world) <= 2, "a refusal is not sent seven times"
    check = notes_check(world)
    assert check["message"].startswith("Warning: the latest write-back could not note 1 of 1 invoiced booking(s)")
    assert invoice["invoiceNumber"] in check["message"] and "WRITE_BACK_TO_BOOKINGS off" in check["message"]
    page = Browser(world).get(f"pages/jobs/{job['jobId']}").get_body().decode()
    assert "Not noted in Bookings" in page and "Bookings refused the change" in page and a in page


def test_under_the_lenient_reading_the_note_is_written_and_reported_as_noted(world):
    world.graph.configure(app_only_business_rules="off")
    world.configure(WRITE_BACK_TO_BOOKINGS="true")
    a = appointment(world)
    world.sync()

    job = run_job(world, {"bookingIds": [a]})

    [invoice] = job["invoices"]
    assert invoice["writeBack"] == {"noted": 1, "notNoted": []}
    assert f"draft invoice {invoice['invoiceNumber']} (" in world.graph.appointment(world.business_ids[0], a)["serviceNotes"]
    check = notes_check(world)
    assert check["ok"] and not check["message"].startswith("Warning") and "noted 1 booking(s)" in check["message"]


def test_without_write_back_jobs_carry_no_write_back_and_status_no_notes_check(world):
    a = appointment(world)
    world.sync()
    job = run_job(world, {"bookingIds": [a]})
    assert job["invoices"][0]["writeBack"] is None
    assert "bookingsNotes" not in [check["name"] for check in body(world.host.http("GET", "status"))["checks"]]
    assert appointment_patches(world) == 0


def test_an_appointment_that_cannot_be_read_by_id_is_reported_and_the_invoice_stands(world):
    world.graph.configure(app_only_business_rules="off")
    world.configure(WRITE_BACK_TO_BOOKINGS="true")
    a = appointment(world)
    world.sync()
    stored = world.graph.appointment(world.business_ids[0], a)
    del stored["startDateTime"]  # changed in Bookings into something the app cannot read
    world.graph.put_appointment(world.business_ids[0], stored)

    job = run_job(world, {"bookingIds": [a]})

    assert job["status"] == "succeeded"
    [missed] = job["invoices"][0]["writeBack"]["notNoted"]
    assert missed["outcome"] == "unreadable" and "is not a valid appointment" in missed["message"]


def test_a_sync_meets_an_unreadable_appointment_read_by_id_and_leaves_it_as_it_was(world):
    a = appointment(world)
    world.sync()
    stored = world.graph.appointment(world.business_ids[0], a)
    del stored["startDateTime"]  # not even an appointment to Graph's schema
    world.graph.put_appointment(world.business_ids[0], stored)
    world.graph.configure(calendar_view_omit=1.0)  # the calendar read leaves it out: it is read by id

    world.sync()

    last = body(world.host.http("GET", "status"))["lastSync"]
    assert last["outcome"] == "partial"
    assert any(a in e["message"] and "UnreadableAppointment" in e["message"] for e in last["errors"]), last["errors"]
    world.graph.configure(calendar_view_omit=0.0)
    listed = body(world.host.http("GET", "bookings/uninvoiced"))["value"]
    assert [row["id"] for row in listed] == [a], "not cancelled on an unreadable answer"


def test_a_future_appointment_within_the_business_rules_is_noted_under_the_strict_reading(world):
    """The rules bind what the app writes, not whether it may write at all: a change that keeps them goes through."""
    from shared.runtime import runtime
    from shared.flows.invoicing.write_back import write_back

    a = appointment(world, hours_ago=-48)
    booking = SimpleNamespace(business_id=world.business_ids[0], id=a)

    async def note():
        return await write_back(runtime(), [booking], {"invoiceNumber": "SI-9", "date": "2026-01-01"})

    [outcome] = world.host.run(note(), 30)

    assert outcome.outcome == "noted"
    assert "draft invoice SI-9 (2026-01-01)" in world.graph.appointment(world.business_ids[0], a)["serviceNotes"]
