"""The data API of `GraphSimulator`: what a Bookings user does in Bookings itself (book, change,
cancel an appointment) and what a test arranges (a business the app cannot see, a malformed
appointment), for the tests, the demo and the benchmark; and what a test checks afterwards (a
business's customers and services, the writes the simulator executed). Every method is
thread-safe."""

from __future__ import annotations

import copy
import threading
import uuid
from datetime import datetime, timezone
from typing import Any

from sandbox.data import Dataset, display_name_of, graph_timestamp
from sandbox.graph.appointments import apply_changes, check_appointment_fields
from sandbox.graph.store import Business
from sandbox.graph.writes import Write


class DataApi:
    """Direct access to the simulated Bookings data (the lock is shared with the HTTP side)."""

    _lock: threading.Lock
    _businesses: dict[str, Business]
    _writes: list[Write]

    def add_business(self, business_id: str, display_name: str | None = None) -> None:
        with self._lock:
            existing = self._businesses.get(business_id.lower())
            if existing is None:
                self._businesses[business_id.lower()] = Business(business_id, display_name or display_name_of(business_id))
            elif display_name:
                existing.display_name = display_name

    def set_scheduling(self, business_id: str, *, business_hours: list[dict] | None = None,
                       minimum_lead_time: str | None = None, time_zone: str | None = None) -> None:
        """Set what a business's admin sets in Bookings and apps writing appointments must keep
        (`sandbox.graph.rules`): its hours (``bookingWorkHours``: ``[{"day": "monday", "timeSlots":
        [{"startTime": "08:00:00", "endTime": "17:00:00"}]}]``; an empty list: none), the scheduling
        policy's ``minimumLeadTime`` (an ISO 8601 duration) and the zone the hours are in."""
        with self._lock:
            business = self._business(business_id)
            if business_hours is not None:
                business.business_hours = copy.deepcopy(business_hours)
            if minimum_lead_time is not None:
                business.scheduling_policy["minimumLeadTime"] = minimum_lead_time
            if time_zone is not None:
                business.time_zone = time_zone

    def load(self, dataset: Dataset) -> None:
        """Replace the services, customers and appointments of the dataset's businesses."""
        for business_id, data in dataset.businesses.items():
            fresh = Business(business_id, data.display_name)
            for service in data.services:
                fresh.services.put(service["id"], copy.deepcopy(service))
            for customer in data.customers:
                fresh.customers.put(customer["id"], copy.deepcopy(customer))
            for appointment in data.appointments:
                fresh.appointments.put(appointment["id"], copy.deepcopy(appointment))
            fresh.calendar_index()
            with self._lock:
                self._businesses[business_id.lower()] = fresh

    def put_service(self, business_id: str, service: dict) -> str:
        return self._put(business_id, "services", service)

    def put_customer(self, business_id: str, customer: dict) -> str:
        return self._put(business_id, "customers", customer)

    def put_appointment(self, business_id: str, appointment: dict) -> str:
        """Create or replace an appointment exactly as given (Graph JSON); returns its id.

        Nothing is validated, so a test can plant a malformed appointment for the app to meet.
        Only a missing id is made up and missing created/updated stamps are set to now."""
        stored = copy.deepcopy(appointment)
        stored.setdefault("id", "AAMkAD" + uuid.uuid4().hex + "AAA=")
        now = graph_timestamp(datetime.now(timezone.utc))
        stored.setdefault("createdDateTime", now)
        stored.setdefault("lastUpdatedDateTime", now)
        return self._put(business_id, "appointments", stored, copy_item=False)

    def delete_appointment(self, business_id: str, appointment_id: str) -> None:
        """Remove an appointment: all a calendar pull ever sees of a cancellation."""
        with self._lock:
            business = self._business(business_id)
            business.appointments.remove(appointment_id)
            business.calendar = None

    def cancel_appointment(self, business_id: str, appointment_id: str) -> None:
        """A staff member cancelling an appointment in Bookings: it leaves the calendar and can no
        longer be read by id (404 ``ErrorItemNotFound``), exactly like a deleted one."""
        self.delete_appointment(business_id, appointment_id)

    def update_appointment(self, business_id: str, appointment_id: str, **fields: Any) -> dict:
        """Change fields (Graph names) as a Bookings user would; bumps `lastUpdatedDateTime`."""
        check_appointment_fields(fields)
        with self._lock:
            business = self._business(business_id)
            apply_changes(business, business.appointments.items[appointment_id], fields)
            return copy.deepcopy(business.appointments.items[appointment_id])

    def delete_customer(self, business_id: str, customer_id: str) -> None:
        """A staff member deleting a customer in Bookings (KeyError if there is none)."""
        with self._lock:
            self._business(business_id).customers.remove(customer_id)

    def set_inaccessible(self, business_id: str, inaccessible: bool = True) -> None:
        with self._lock:
            self._business(business_id).inaccessible = inaccessible

    def appointment(self, business_id: str, appointment_id: str) -> dict:
        """The stored appointment, notes included (KeyError if it does not exist)."""
        with self._lock:
            return copy.deepcopy(self._business(business_id).appointments.items[appointment_id])

    def appointments(self, business_id: str) -> list[dict]:
        with self._lock:
            return copy.deepcopy(list(self._business(business_id).appointments.items.values()))

    def customers(self, business_id: str) -> list[dict]:
        """A business's customers as stored, in creation order (KeyError for an unknown business)."""
        with self._lock:
            return copy.deepcopy(list(self._business(business_id).customers.items.values()))

    def services(self, business_id: str) -> list[dict]:
        """A business's services as stored (``defaultReminders`` included), in creation order."""
        with self._lock:
            return copy.deepcopy(list(self._business(business_id).services.items.values()))

    def customer(self, business_id: str, customer_id: str) -> dict:
        with self._lock:
            return copy.deepcopy(self._business(business_id).customers.items[customer_id])

    def service(self, business_id: str, service_id: str) -> dict:
        with self._lock:
            return copy.deepcopy(self._business(business_id).services.items[service_id])

    def writes(self, business_id: str | None = None, kind: str | None = None,
               method: str | None = None) -> list[Write]:
        """The writes executed over HTTP (oldest first), optionally only those to one business, of
        one kind (``customers``, ``services``, ``appointments``) or one method (``POST`` creates,
        ``PATCH`` changes). A write counts once it is committed, whatever its client saw: a create
        whose answer a ``lost`` fault dropped is here, one refused (400, 403, 429…) is not. The
        data API's own changes are not writes."""
        with self._lock:
            return [w for w in self._writes
                    if (business_id is None or w.business_id.lower() == business_id.lower())
                    and (kind is None or w.kind == kind) and (method is None or w.method == method.upper())]

    def clear_writes(self) -> None:
        with self._lock:
            self._writes.clear()

    def _business(self, business_id: str) -> Business:
        return self._businesses[business_id.lower()]

    def _put(self, business_id: str, kind: str, item: dict, copy_item: bool = True) -> str:
        stored = copy.deepcopy(item) if copy_item else item
        stored.setdefault("id", str(uuid.uuid4()))
        with self._lock:
            if business_id.lower() not in self._businesses:
                self._businesses[business_id.lower()] = Business(business_id, display_name_of(business_id))
            business = self._business(business_id)
            getattr(business, kind).put(stored["id"], stored)
            if kind == "appointments":
                business.calendar = None
        return stored["id"]
