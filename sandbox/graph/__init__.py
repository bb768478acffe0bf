"""Simulated Microsoft Graph v1.0 Bookings (`/v1.0/solutions/bookingBusinesses/…`).

Faithful where the app can go wrong against the real service (each point is a row of
`sandbox/FIDELITY.md`):

- every request needs a Bearer token for ``https://graph.microsoft.com`` (else 401
  ``InvalidAuthenticationToken``) carrying an application permission the operation accepts
  (else 403 ``ErrorAccessDenied``) — `permissions`;
- ``calendarView`` needs ``start`` and ``end``; which appointments "occur in" the window is a
  knob (default: those *starting* in it); collections are paged with an absolute
  ``@odata.nextLink`` carrying an opaque ``$skiptoken``; sending ``$top`` returns that many and
  *no* next link, as the real service does, so a client that sends it silently loses data —
  `wire`, `store`;
- the businesses list answers at most 500, in one page; a calendar view can be capped silently
  (knob) — `app`;
- lists return ``serviceNotes`` empty (and no ``reminders`` / ``customerNotes``): only a GET by id
  has them; start and end are UTC unless a response time zone (Windows or IANA name) is set —
  `appointments`, `times`;
- an inaccessible or unknown business answers 404 ``ErrorFolderNotFound``, not 403; a deleted or
  cancelled appointment read by id answers 404 ``ErrorItemNotFound``;
- ``$batch`` takes at most 20 requests; inner requests run concurrently through the same fault,
  limit and permission machinery, so a batch of more than four requests to one mailbox meets the
  per-mailbox concurrency limit and some answers are 429 inside a 200 batch, as in Graph —
  `batch`;
- ``$filter``, ``$orderby``, ``$skip`` and ``$search`` are refused (400) so the app cannot come to
  rely on server-side filtering that Bookings does not promise;
- customers and services are created (``POST``, 201 with the entity, a server-assigned id and
  ``createdDateTime``/``lastUpdatedDateTime``) and changed (``PATCH``: a customer answers 200 with
  itself as documented, a service 204), each body checked against the v1.0 schema (unknown
  properties, types, enums, ``Edm.Duration``, SMTP addresses, the lengths of `limits`) — `schema`,
  `writes`; customers need ``BookingsAppointment.ReadWrite.All`` (or a higher permission), services
  ``Bookings.ReadWrite.All`` or ``Bookings.Manage.All``; nothing is unique (two customers may share
  an e-mail address), and every executed write is logged for the tests (`writes(...)`).

By default (no plan given) each mailbox serves at most 4 requests at once and answers 429 beyond
that, the documented Graph limit for Bookings; pass a `FaultPlan` to change it.
"""

from sandbox.graph.app import CONCURRENCY_PER_MAILBOX, MAX_LISTED_BUSINESSES, GraphSimulator, default_plan
from sandbox.graph.batch import MAX_BATCH_REQUESTS
from sandbox.graph.limits import DEFAULT_FIELD_LIMITS
from sandbox.graph.options import GraphOptions
from sandbox.graph.times import parse_instant
from sandbox.graph.wire import BUSINESSES_PATH, GraphError, graph_error_body, mailbox_of
from sandbox.graph.writes import Write

__all__ = ["BUSINESSES_PATH", "CONCURRENCY_PER_MAILBOX", "DEFAULT_FIELD_LIMITS", "MAX_BATCH_REQUESTS",
           "MAX_LISTED_BUSINESSES", "GraphError", "GraphOptions", "GraphSimulator", "Write", "default_plan",
           "graph_error_body", "mailbox_of", "parse_instant"]
