"""Deterministic Bookings data, shaped exactly like Graph v1.0 JSON, for the Graph simulator.

One generator feeds the tests, the demo and the benchmark, so the awkward real-world cases are
always there and a failure can be replayed from its seed:

- customers without an e-mail (``None`` or ``""``, about 3 %), an apostrophe in an e-mail
  (``o'brien@example.com``), and two Bookings customers whose e-mails differ only by case and a
  trailing blank (``Alice@Example.com`` / ``alice@example.com ``);
- group bookings (2–4 entries in ``customers[]``, about 5 %);
- in about half of single-customer appointments an empty ``customers[]``, the customer being only
  in ``customerEmailAddress`` / ``customerName`` / ``customerPhone`` (the common real case);
- every ``priceType``, durations of 30–180 minutes in 15-minute steps, a staff-edited price now
  and then (the appointment's price, not the service's, is what was agreed);
- about 70 % of appointments over, a few running now, the rest ahead;
- both spellings of a UTC ``dateTime``: ``…0000000+00:00`` and ``…0000000Z``.

Every business gets the same people as Bookings customers (with its own customer ids), so one
person booking at two mailboxes is common, as it is for a business with several calendars. The
guaranteed cases need at least 5 customers and about 25 appointments; with fewer the generator
still works but cannot fit them all. Ids, names and prices depend only on the seed and the
counts; the times also depend on `now`.
"""

from __future__ import annotations

import base64
import random
import re
import unicodedata
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

PRICE_TYPES = ("undefined", "fixedPrice", "startingAt", "hourly", "free", "priceVaries", "callUs", "notSet")
DURATIONS_MINUTES = tuple(range(30, 181, 15))
APOSTROPHE_EMAIL = "o'brien@example.com"
MIXED_CASE_EMAILS = ("Alice@Example.com", "alice@example.com ")

_BUSINESS_NAMES = ("contoso", "fabrikam", "northwind", "adventureworks", "tailspin", "wingtip",
                   "litware", "proseware", "woodgrove", "lucerne")


def business_ids(n: int) -> tuple[str, ...]:
    """`n` Bookings mailbox ids; the first is always the single default business."""
    names = [_BUSINESS_NAMES[i] if i < len(_BUSINESS_NAMES) else f"bookings{i:03d}" for i in range(n)]
    return tuple(f"{name}@contoso.onmicrosoft.com" for name in names)


BUSINESS_IDS = business_ids(1)

_FIRST_NAMES = ("Adele", "Ben", "Chloé", "Daniel", "Emma", "Farid", "Grace", "Hiroshi", "Isabel",
                "Jonas", "Katarzyna", "Liam", "Mia", "Noah", "Olivia", "Pedro", "Quinn", "Rosa",
                "Sven", "Tanvi", "Umar", "Valentina", "Wei", "Ximena", "Yusuf", "Zoë", "José",
                "Ingrid", "Amara", "Björn")
_LAST_NAMES = ("Vance", "Müller", "Smith", "García", "Nguyen", "Kowalski", "Okafor", "Rossi",
               "Andersson", "Dubois", "Tanaka", "Patel", "Cohen", "Silva", "Jensen", "Núñez",
               "Fischer", "Brown", "Kim", "Novak", "Haddad", "Larsen", "Moreau", "Schmidt", "Wilson")
_DOMAINS = ("example.com", "example.org", "example.net", "contoso.com", "fabrikam.com")
_PLACES = (  # street, city, state, countryOrRegion, postalCode
    ("Pike Place", "Seattle", "WA", "United States", "98052"),
    ("Michigan Avenue", "Chicago", "IL", "United States", "60601"),
    ("High Street", "London", "", "United Kingdom", "EC1A 1BB"),
    ("Hauptstraße", "München", "Bayern", "Germany", "80331"),
    ("Rue de Rivoli", "Paris", "", "France", "75002"),
    ("Queen Street W", "Toronto", "ON", "Canada", "M5H 2N2"),
    ("George Street", "Sydney", "NSW", "Australia", "2000"),
    ("Damrak", "Amsterdam", "", "Netherlands", "1012 JS"),
)
_TIME_ZONES = ("UTC", "Europe/London", "Europe/Berlin", "America/New_York", "America/Chicago",
               "Australia/Sydney")
_SERVICE_NAMES = (
    "Initial consultation", "Follow-up session", "Tax return review", "Bookkeeping hour",
    "Payroll setup", "Strategy workshop", "Group training", "Year-end close", "VAT filing",
    "Budget planning", "Coaching session", "IT health check", "Site visit", "Photo session",
    "Massage", "Physiotherapy", "Dental check-up", "Haircut & style", "Language lesson",
    "Guitar lesson", "Legal advice", "Notary appointment", "Car service", "Home inspection",
    "Design review", "Nutrition consult", "Yoga class", "Team workshop", "Webinar Q&A",
    "Emergency call-out", "Intro call", "Quote on request",
)
_NOTES = ("Bring last year's statements.", "Customer asked for an invoice in English.",
          "Parking at the back entrance.", "Follow up in two weeks.",
          "Discount agreed on the phone: see price.", "Paid a deposit of 20.")
_NO_SHOW_ID = "00000000-0000-0000-0000-000000000000"


def iso_duration(minutes: int) -> str:
    """Minutes as the ISO 8601 duration Graph uses (`PT1H30M`, `PT45M`, `PT0S`)."""
    if minutes == 0:
        return "PT0S"
    hours, rest = divmod(minutes, 60)
    return "PT" + (f"{hours}H" if hours else "") + (f"{rest}M" if rest else "")


def graph_datetime(moment: datetime, z_suffix: bool = False) -> dict:
    """A `dateTimeTimeZone` in UTC with Graph's 7 fractional digits, in either spelling."""
    utc = moment.astimezone(timezone.utc)
    suffix = "Z" if z_suffix else "+00:00"
    return {"dateTime": f"{utc:%Y-%m-%dT%H:%M:%S}.{utc.microsecond:06d}0{suffix}", "timeZone": "UTC"}


def graph_timestamp(moment: datetime) -> str:
    """A `DateTimeOffset` as Graph writes it (`2026-11-20T09:00:00.1234560Z`)."""
    utc = moment.astimezone(timezone.utc)
    return f"{utc:%Y-%m-%dT%H:%M:%S}.{utc.microsecond:06d}0Z"


def new_appointment_id(rng: random.Random) -> str:
    """An Exchange-style item id: long, URL-safe base64, `AAMkAD…AAA=`."""
    return "AAMkAD" + base64.urlsafe_b64encode(rng.randbytes(102)).decode().rstrip("=") + "AAA="


def _guid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _ascii(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower())


@dataclass
class BusinessData:
    business_id: str
    display_name: str
    services: list[dict] = field(default_factory=list)
    customers: list[dict] = field(default_factory=list)
    appointments: list[dict] = field(default_factory=list)
    staff_member_ids: list[str] = field(default_factory=list)


@dataclass
class Dataset:
    seed: int
    now: datetime
    window_start: datetime
    window_end: datetime
    businesses: dict[str, BusinessData]

    def appointments(self) -> Iterator[tuple[str, dict]]:
        """Every appointment with its business id."""
        for business_id, business in self.businesses.items():
            for appointment in business.appointments:
                yield business_id, appointment

    @property
    def appointment_count(self) -> int:
        return sum(len(b.appointments) for b in self.businesses.values())


@dataclass
class _Person:
    name: str
    email: str | None
    phones: list[dict]
    address: dict | None
    time_zone: str


@dataclass
class _Spec:
    """What one appointment will be, decided before its JSON is built so gaps can be filled."""
    business: int
    service: int
    people: list[int]
    minutes: int
    start: datetime
    embed: bool
    z_suffix: bool
    price_type: str | None = None
    price: float | None = None


def display_name_of(business_id: str) -> str:
    return business_id.split("@", 1)[0].replace("-", " ").title()


def generate(appointments: int = 250, customers: int = 60, services: int = 8,
             business_ids: tuple[str, ...] | list[str] = BUSINESS_IDS, seed: int = 1,
             now: datetime | None = None, lookback_days: int = 60, lookahead_days: int = 30) -> Dataset:
    """Build a dataset; `customers` and `services` are per business, `appointments` in total."""
    if customers < 1 or services < 1 or not business_ids:
        raise ValueError("need at least one customer, one service and one business")
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    rng = random.Random(seed)
    people = _people(rng, customers)
    catalogue = _catalogue(rng, services)
    businesses = {}
    for business_id in business_ids:
        businesses[business_id] = BusinessData(
            business_id=business_id,
            display_name=display_name_of(business_id),
            staff_member_ids=[_guid(rng) for _ in range(3)],
        )
        business = businesses[business_id]
        business.services = [dict(service, id=_guid(rng)) for service in catalogue]
        business.customers = [_customer_json(rng, person, now) for person in people]

    window = _Window(now, lookback_days, lookahead_days)
    group_services = [i for i, s in enumerate(catalogue) if s["maximumAttendeesCount"] > 1]
    specs = [_random_spec(rng, i % len(business_ids), catalogue, group_services, customers, window)
             for i in range(appointments)]
    _fill_gaps(rng, specs, people, catalogue, group_services, window)

    ordered = list(businesses.values())
    for spec in specs:
        business = ordered[spec.business]
        business.appointments.append(_appointment_json(rng, spec, business, people, now))
    return Dataset(seed=seed, now=now, window_start=now - timedelta(days=lookback_days),
                   window_end=now + timedelta(days=lookahead_days), businesses=businesses)


def _people(rng: random.Random, count: int) -> list[_Person]:
    people = []
    for index in range(count):
        first, last = rng.choice(_FIRST_NAMES), rng.choice(_LAST_NAMES)
        email = f"{_ascii(first)}.{_ascii(last)}{index}@{rng.choice(_DOMAINS)}"
        if rng.random() < 0.05:
            email = email.title()
        phones = []
        if rng.random() < 0.9:
            phones.append({"number": f"+1 425 555 {rng.randrange(10000):04d}", "type": "mobile"})
        if rng.random() < 0.2:
            phones.append({"number": f"+44 20 7946 {rng.randrange(10000):04d}", "type": "business"})
        address = None
        if rng.random() < 0.8:
            street, city, state, country, postal = rng.choice(_PLACES)
            address = {"street": f"{rng.randint(1, 250)} {street}", "city": city,
                       "state": state, "countryOrRegion": country, "postalCode": postal,
                       "type": rng.choice(("home", "business"))}
        people.append(_Person(f"{first} {last}", email, phones, address, rng.choice(_TIME_ZONES)))
    if count >= 5:
        people[0].name, people[0].email = "Siobhán O'Brien", APOSTROPHE_EMAIL
        people[1].name, people[1].email = "Alice Martin", MIXED_CASE_EMAILS[0]
        people[2].name, people[2].email = "alice martin", MIXED_CASE_EMAILS[1]
        without_email = max(1, round(count * 0.03))
        for n, index in enumerate(rng.sample(range(3, count), min(without_email, count - 3))):
            people[index].email = None if n % 2 == 0 else ""
    return people


def _catalogue(rng: random.Random, count: int) -> list[dict]:
    """Services without ids (each business gets its own ids for the same catalogue)."""
    services = []
    for index in range(count):
        name = _SERVICE_NAMES[index % len(_SERVICE_NAMES)]
        if index >= len(_SERVICE_NAMES):
            name = f"{name} {index // len(_SERVICE_NAMES) + 1}"
        price_type = PRICE_TYPES[index % len(PRICE_TYPES)]
        group = index % 4 == 3 or (index == count - 1 and count < 4)
        services.append({
            "@odata.type": "#microsoft.graph.bookingService",
            "id": None,
            "displayName": name,
            "defaultDuration": iso_duration(rng.choice(DURATIONS_MINUTES)),
            "defaultPrice": _price_for(rng, price_type),
            "defaultPriceType": price_type,
            "description": f"{name} ({price_type}).",
            "isHiddenFromCustomers": index % 7 == 6,
            "notes": "",
            "preBuffer": "PT0S",
            "postBuffer": rng.choice(("PT0S", "PT10M", "PT15M")),
            "staffMemberIds": [],
            "maximumAttendeesCount": rng.choice((4, 6, 8)) if group else 1,
            "isLocationOnline": index % 5 == 4,
            "smsNotificationsEnabled": False,
            "languageTag": "en-US",
            "defaultReminders": [],
        })
    return services


def _price_for(rng: random.Random, price_type: str) -> float:
    if price_type == "fixedPrice":
        return rng.choice((45.0, 60.0, 75.0, 90.0, 120.0, 150.0, 199.99))
    if price_type == "hourly":
        return rng.choice((35.0, 55.0, 80.0, 95.5))
    if price_type == "startingAt":
        return rng.choice((25.0, 40.0, 60.0))
    if price_type == "priceVaries":
        return rng.choice((50.0, 70.0))
    return 0.0


def _customer_json(rng: random.Random, person: _Person, now: datetime) -> dict:
    created = now - timedelta(days=rng.randint(90, 900), seconds=rng.randrange(86400))
    return {
        "@odata.type": "#microsoft.graph.bookingCustomer",
        "id": _guid(rng),
        "displayName": person.name,
        "emailAddress": person.email,
        "addresses": [dict(person.address)] if person.address else [],
        "phones": [dict(phone) for phone in person.phones],
        "createdDateTime": graph_timestamp(created),
        "lastUpdatedDateTime": graph_timestamp(created + timedelta(days=rng.randint(0, 60))),
    }


class _Window:
    """Where appointment starts fall: on a 15-minute grid in business hours around `now`."""

    def __init__(self, now: datetime, lookback_days: int, lookahead_days: int):
        self.now = now
        self.midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        self.quarter = now.replace(minute=now.minute - now.minute % 15, second=0, microsecond=0)
        self.lookback_days = max(lookback_days, 1)
        self.lookahead_days = lookahead_days

    def past(self, rng: random.Random, minutes: int) -> datetime:
        start = self.midnight - timedelta(days=rng.randint(0, max(self.lookback_days - 2, 0))) + self._slot(rng)
        return start - timedelta(days=1) if start + timedelta(minutes=minutes) > self.now else start

    def future(self, rng: random.Random) -> datetime:
        start = self.midnight + timedelta(days=rng.randint(0, max(self.lookahead_days - 2, 1))) + self._slot(rng)
        return start + timedelta(days=1) if start < self.now else start

    def running(self, rng: random.Random, minutes: int) -> datetime:
        """Started before now, ends after now."""
        return self.quarter - timedelta(minutes=15 * rng.randint(1, minutes // 15 - 1))

    def any(self, rng: random.Random, minutes: int) -> datetime:
        draw = rng.random()
        if draw < 0.70 or (draw >= 0.73 and self.lookahead_days <= 0):
            return self.past(rng, minutes)
        if draw < 0.73:
            return self.running(rng, minutes)
        return self.future(rng)

    @staticmethod
    def _slot(rng: random.Random) -> timedelta:
        return timedelta(minutes=15 * rng.randrange(32, 72))


def _random_spec(rng: random.Random, business: int, catalogue: list[dict], group_services: list[int],
                 customers: int, window: _Window) -> _Spec:
    minutes = rng.choice(DURATIONS_MINUTES)
    if customers >= 2 and group_services and rng.random() < 0.05:
        service = rng.choice(group_services)
        size = rng.randint(2, min(4, customers, catalogue[service]["maximumAttendeesCount"]))
        people = rng.sample(range(customers), size)
    else:
        service, people = rng.randrange(len(catalogue)), [rng.randrange(customers)]
    spec = _Spec(business=business, service=service, people=people, minutes=minutes,
                 start=window.any(rng, minutes), embed=rng.random() < 0.5, z_suffix=rng.random() < 0.5)
    price_type = catalogue[service]["defaultPriceType"]
    if price_type in ("fixedPrice", "hourly", "startingAt") and rng.random() < 0.08:
        spec.price = round(catalogue[service]["defaultPrice"] * rng.choice((0.8, 0.9, 1.1)), 2)
    return spec


def _fill_gaps(rng: random.Random, specs: list[_Spec], people: list[_Person], catalogue: list[dict],
               group_services: list[int], window: _Window) -> None:
    """Make sure every case the module docstring promises occurs at least once.

    Each case claims the appointment that shows it, so a later fix cannot undo an earlier one."""
    claimed: set[int] = set()

    def ensure(holds: Callable[[_Spec], bool], make: Callable[[_Spec], None]) -> None:
        for index, spec in enumerate(specs):
            if holds(spec):
                claimed.add(index)
                return
        free = [index for index in range(len(specs)) if index not in claimed]
        if free:
            index = rng.choice(free)
            make(specs[index])
            claimed.add(index)

    def solo(spec: _Spec, person: int | None = None) -> None:
        spec.people = [spec.people[0] if person is None else person]
        if catalogue[spec.service]["maximumAttendeesCount"] > 1 and len(catalogue) > len(group_services):
            spec.service = next(i for i in range(len(catalogue)) if i not in group_services)

    def single(person: int) -> Callable[[_Spec], None]:
        return lambda spec: solo(spec, person)

    def embedded(flag: bool) -> Callable[[_Spec], None]:
        def make(spec: _Spec) -> None:
            solo(spec)
            spec.embed = flag
        return make

    if len(people) >= 5:
        for person in (0, 1, 2):
            ensure(lambda s, p=person: p in s.people, single(person))
        no_email = [i for i, p in enumerate(people) if not p.email]
        ensure(lambda s: any(p in no_email for p in s.people), single(no_email[0]))
    if len(people) >= 2 and group_services:
        def make_group(spec: _Spec) -> None:
            spec.service = group_services[0]
            spec.people = rng.sample(range(len(people)), min(3, len(people)))
        ensure(lambda s: len(s.people) > 1, make_group)
    ensure(lambda s: len(s.people) == 1 and not s.embed, embedded(False))
    ensure(lambda s: len(s.people) == 1 and s.embed, embedded(True))
    ensure(lambda s: s.z_suffix, lambda s: setattr(s, "z_suffix", True))
    ensure(lambda s: not s.z_suffix, lambda s: setattr(s, "z_suffix", False))

    def ends(spec: _Spec) -> datetime:
        return spec.start + timedelta(minutes=spec.minutes)
    ensure(lambda s: s.start < window.now < ends(s), lambda s: setattr(s, "start", window.running(rng, s.minutes)))
    if window.lookahead_days > 0:
        ensure(lambda s: s.start >= window.now, lambda s: setattr(s, "start", window.future(rng)))
    ensure(lambda s: ends(s) <= window.now, lambda s: setattr(s, "start", window.past(rng, s.minutes)))

    def priced(price_type: str) -> Callable[[_Spec], None]:
        def make(spec: _Spec) -> None:
            spec.price_type, spec.price = price_type, _price_for(rng, price_type)
        return make
    for price_type in PRICE_TYPES:
        ensure(lambda s, t=price_type: (s.price_type or catalogue[s.service]["defaultPriceType"]) == t,
               priced(price_type))


def _location(display_name: str, address: dict | None) -> dict:
    address = address or {}
    return {
        "displayName": display_name,
        "locationEmailAddress": None,
        "locationUri": "",
        "locationType": None,
        "uniqueId": None,
        "uniqueIdType": None,
        "address": {key: address.get(key, "") for key in ("street", "city", "state", "countryOrRegion", "postalCode")},
        "coordinates": {"altitude": None, "latitude": None, "longitude": None, "accuracy": None,
                        "altitudeAccuracy": None},
    }


def _customer_information(person: _Person, customer: dict) -> dict:
    address = person.address
    return {
        "@odata.type": "#microsoft.graph.bookingCustomerInformation",
        "customerId": customer["id"],
        "name": person.name,
        "emailAddress": person.email,
        "phone": person.phones[0]["number"] if person.phones else "",
        "notes": None,
        "smsNotificationsEnabled": False,
        "location": _location(f"{address['street']}, {address['city']}" if address else "Customer", address),
        "timeZone": person.time_zone,
    }


def _appointment_json(rng: random.Random, spec: _Spec, business: BusinessData, people: list[_Person],
                      now: datetime) -> dict:
    service = business.services[spec.service]
    start = spec.start
    end = start + timedelta(minutes=spec.minutes)
    created = min(start - timedelta(minutes=rng.randint(60, 60 * 24 * 30)), now - timedelta(minutes=5))
    created += timedelta(microseconds=rng.randrange(10**6))
    updated = min(created + timedelta(minutes=rng.randint(0, 60 * 24 * 3), microseconds=rng.randrange(10**6)), now)
    attendees = [(people[i], business.customers[i]) for i in spec.people]
    online = bool(service["isLocationOnline"])
    if len(attendees) == 1:
        person, _ = attendees[0]
        single = {"customerEmailAddress": person.email, "customerName": person.name,
                  "customerPhone": person.phones[0]["number"] if person.phones else "",
                  "customerTimeZone": person.time_zone}
        infos = [_customer_information(p, c) for p, c in attendees] if spec.embed else []
    else:
        single = {"customerEmailAddress": None, "customerName": None, "customerPhone": None,
                  "customerTimeZone": "UTC"}
        infos = [_customer_information(p, c) for p, c in attendees]
    return {
        "@odata.type": "#microsoft.graph.bookingAppointment",
        "id": new_appointment_id(rng),
        "selfServiceAppointmentId": _guid(rng) if rng.random() < 0.3 else _NO_SHOW_ID,
        "additionalInformation": "",
        "appointmentLabel": "",
        "isCustomerAllowedToManageBooking": False,
        "isLocationOnline": online,
        "joinWebUrl": f"https://teams.microsoft.com/l/meetup-join/{_guid(rng)}" if online else None,
        "anonymousJoinWebUrl": None,
        **single,
        "customerNotes": None,
        "customers": infos,
        "smsNotificationsEnabled": False,
        "serviceId": service["id"],
        "serviceName": service["displayName"],
        "duration": iso_duration(spec.minutes),
        "preBuffer": service["preBuffer"],
        "postBuffer": service["postBuffer"],
        "priceType": spec.price_type or service["defaultPriceType"],
        "price": spec.price if spec.price is not None else service["defaultPrice"],
        "serviceNotes": rng.choice(_NOTES) if rng.random() < 0.3 else "",
        "optOutOfCustomerEmail": rng.random() < 0.1,
        "staffMemberIds": [rng.choice(business.staff_member_ids)],
        "startDateTime": graph_datetime(start, spec.z_suffix),
        "endDateTime": graph_datetime(end, spec.z_suffix),
        "serviceLocation": _location(f"{business.display_name} office", None),
        "reminders": [],
        "maximumAttendeesCount": service["maximumAttendeesCount"],
        "filledAttendeesCount": len(attendees),
        "createdDateTime": graph_timestamp(created),
        "lastUpdatedDateTime": graph_timestamp(updated),
    }
