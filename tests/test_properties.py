"""Properties of every edge: whatever arrives over HTTP or on a queue, the app answers 2xx or a
4xx problem (never 5xx), processes a message or poisons it with a readable reason (never loses
it), and a rejected input writes nothing.

One world for the module (a few dozen synced bookings); hypothesis draws the inputs. Each test
adds how many inputs it tried to the closing summary line (`properties: N inputs tried`)."""

from __future__ import annotations

import base64
import binascii
import json
import string
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sandbox.data import generate, graph_datetime
from shared.flows.messages import InvoiceJobPart, SyncRequest, directory_upsert, sync_part
from shared.storage.store import BOOKINGS, CUSTOMER_LINKS, ITEM_LINKS, JOBS, TEMPLATES
from tests.conftest import make_world
from tests.helpers import body, peek_raw, queue_client, rows
from tests.plugins.chaos import BUDGET, TALLY

MAX_BODY = 1_048_576
QUEUES = ("directory-upserts", "invoice-jobs", "sync-requests", "sync-businesses")


def fuzz(examples: int):
    """`examples` inputs in `make test`, more under `--long` (`make test-long`)."""
    return settings(max_examples=BUDGET.examples(examples), deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# -- the world ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pworld(sandbox):
    with pytest.MonkeyPatch.context() as monkeypatch:
        world = make_world(sandbox, monkeypatch)
        world.graph.load(generate(appointments=40, customers=10, services=8, business_ids=world.business_ids,
                                  seed=99))
        world.sync()
        accepted = world.host.http("POST", "invoices", body={"bookingIds": invoiceable(world)[:3]})
        world.known_job = body(accepted)["jobId"]
        world.host.drain()
        yield world
        world.host.close()


def invoiceable(world) -> list[str]:
    return [r["id"] for r in body(world.host.http("GET", "bookings/uninvoiced", params={"top": "1000"}))["value"]
            if r["invoiceable"]]


def replenish(world, at_least: int = 8) -> None:
    """Accepted jobs use bookings up: add ended appointments when few are left."""
    if len(invoiceable(world)) >= at_least:
        return
    start = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    for index in range(at_least):
        begin = start - timedelta(hours=3 + index)
        world.graph.put_appointment(world.business_ids[0], {
            "id": f"AAMkProp{uuid.uuid4().hex}=", "startDateTime": graph_datetime(begin),
            "endDateTime": graph_datetime(begin + timedelta(minutes=45)), "duration": "PT45M",
            "serviceId": "svc-prop", "serviceName": "Property check", "price": 30.0, "priceType": "fixedPrice",
            "customers": [], "customerEmailAddress": f"prop{index}@example.com", "customerName": f"P {index}"})
    world.sync()


def invoicing_state(world) -> dict:
    """What a rejected request must not change: each booking's claims, invoices and state."""
    return {r["AppointmentId"]: (r.get("Claims") or "{}", r.get("Invoices") or "{}", r.get("InvoiceState"))
            for r in rows(world, BOOKINGS)}


def table_state(world, tables=(BOOKINGS, JOBS, TEMPLATES, CUSTOMER_LINKS, ITEM_LINKS)) -> dict:
    """Every row of the app's tables except its own bookkeeping (timestamps and ETags aside)."""
    state = {}
    for table in tables:
        for row in rows(world, table):
            state[(table, row["PartitionKey"], row["RowKey"])] = json.dumps(dict(row), sort_keys=True, default=str)
    return state


# -- what every answer must look like -------------------------------------------------------------

def check_answer(response, route: str) -> dict | list | None:
    status = response.status_code
    raw = response.get_body() or b""
    assert 200 <= status < 300 or 400 <= status < 500, f"{route} answered {status}: {raw[:500]!r}"
    assert b"Traceback" not in raw and b'File "' not in raw, f"{route} leaked a stack trace"
    parsed = json.loads(raw) if raw else None
    if status >= 400:
        assert response.mimetype == "application/problem+json", f"{route} {status} is {response.mimetype}"
        assert isinstance(parsed, dict), parsed
        assert parsed.get("status") == status, parsed
        assert isinstance(parsed.get("title"), str) and parsed["title"], parsed
        assert isinstance(parsed.get("detail"), str) and parsed["detail"], parsed
    return parsed


# -- strategies -----------------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=6)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=6), max_leaves=25)
weird_text = st.one_of(
    st.text(max_size=80),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF, blacklist_categories=("Cs",)),
            max_size=40),
    st.sampled_from(["", " ", "\x00", "null", "[]", "{}", "' or 1 eq 1 or '", "%00", "../../", "😀" * 10,
                     "x" * 5000, "\u202e", "0", "-1", "1e309", "NaN"]),
)
datetimes = st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59),
                         timezones=st.sampled_from([None, timezone.utc, timezone(timedelta(hours=14)),
                                                    timezone(timedelta(hours=-14)), timezone(timedelta(hours=5, minutes=30))]))
content_types = st.sampled_from(["application/json", "application/json; charset=utf-8", "application/problem+json",
                                 "text/json", "text/plain", "", "multipart/form-data", "application/x-www-form-urlencoded"])


def encoded(value) -> bytes:
    return json.dumps(value).encode()


def huge_body(size: int) -> bytes:
    return b'{"bookingIds": ["' + b"A" * size + b'"]}'


raw_bodies = st.one_of(
    json_values.map(encoded),
    st.binary(max_size=200),
    weird_text.map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.integers(min_value=MAX_BODY - 40, max_value=MAX_BODY + 4000).map(huge_body),
)


booking_refs = st.one_of(st.tuples(st.just("open"), st.integers(min_value=0, max_value=999)),
                         st.tuples(st.just("stored"), st.integers(min_value=0, max_value=999)),
                         weird_text, st.integers(), st.none())


@st.composite
def invoice_requests(draw, business_ids: list[str]):
    """Mostly near-valid requests, some of any shape. Booking ids are drawn as references
    ("the k-th open one", "the k-th stored one") and resolved when the request is sent, so what
    hypothesis draws does not depend on what earlier examples changed."""
    shape = draw(st.sampled_from(["ids", "all", "both", "neither", "any"]))
    if shape == "any":
        return draw(raw_bodies)
    request: dict = {}
    if shape in ("ids", "both"):
        request["bookingIds"] = draw(st.lists(booking_refs, max_size=6))
    if shape in ("all", "both"):
        request["all"] = draw(st.one_of(st.booleans(), json_values))
    for name in ("businessId", "customerEmail", "dryRun", draw(st.text(max_size=8))):
        if draw(st.booleans()):
            request[name] = draw(st.one_of(json_values, weird_text, st.sampled_from(business_ids)))
    return request


def resolve_request(world, request) -> bytes:
    if isinstance(request, bytes):
        return request
    if isinstance(request.get("bookingIds"), list):
        open_ids, stored = invoiceable(world), sorted(invoicing_state(world))

        def pick(ref):
            if isinstance(ref, tuple):
                pool = open_ids if ref[0] == "open" else stored
                return pool[ref[1] % len(pool)] if pool else "AAMk="
            return ref
        request = {**request, "bookingIds": [pick(ref) for ref in request["bookingIds"]]}
    return encoded(request)


# -- HTTP routes ----------------------------------------------------------------------------------

@fuzz(60)
@given(data=st.data())
def test_any_invoice_request_is_answered_2xx_or_a_4xx_problem_and_a_rejected_one_claims_nothing(pworld, data):
    world = pworld
    raw = resolve_request(world, data.draw(invoice_requests(world.business_ids)))
    content_type = data.draw(content_types)
    before, jobs_before = invoicing_state(world), {r["PartitionKey"] for r in rows(world, JOBS)}
    TALLY.tried("POST /api/invoices")

    response = world.host.http("POST", "invoices", body=raw, headers={"Content-Type": content_type})

    parsed = check_answer(response, "POST /api/invoices")
    if response.status_code == 202:
        assert parsed["jobId"] and parsed["bookingCount"] > 0 and response.headers["Location"]
        claimed = {i for i, (claims, _, _) in invoicing_state(world).items() if parsed["jobId"] in claims}
        assert len(claimed) == parsed["bookingCount"], "the job claimed what it counted"
        world.host.drain(queues=["invoice-jobs"])
        replenish(world)
        return
    assert invoicing_state(world) == before, "a request answered without a job changed the bookings"
    new_jobs = {r["PartitionKey"] for r in rows(world, JOBS) if r["RowKey"] == "job" and r.get("Status") != "rejected"}
    assert new_jobs - jobs_before == set(), "a request answered without a job left a job behind"
    if response.status_code == 413:
        assert len(raw) > MAX_BODY


edge_instants = st.sampled_from(["0001-01-01T00:00:00+14:00", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59-14:00",
                                  "9999-12-31T23:59:59.999999Z", "2026-02-30T00:00:00Z", "2026-01-01", "24:00",
                                  "2026-01-01T00:00:00+25:00", "1970-01-01T00:00:00Z"])
query_values = st.one_of(weird_text, datetimes.map(lambda d: d.isoformat()), edge_instants,
                         st.integers(min_value=-10**6, max_value=10**6).map(str), st.floats().map(str))


@st.composite
def uninvoiced_queries(draw, world) -> dict:
    instants = st.one_of(edge_instants, datetimes.map(lambda d: d.isoformat()), query_values)
    query = draw(st.fixed_dictionaries({}, optional={
        "businessId": st.one_of(st.sampled_from(world.business_ids), query_values),
        "customerEmail": st.one_of(st.emails(), query_values), "from": instants, "to": instants,
        "top": st.one_of(st.integers(min_value=-5, max_value=1005).map(str), query_values),
        "skipToken": query_values}))
    if draw(st.integers(min_value=0, max_value=9)) == 0:
        query[draw(st.text(min_size=1, max_size=10))] = draw(query_values)
    if draw(st.booleans()):
        # A continuation token made of any JSON, as a client could forge it.
        token = base64.urlsafe_b64encode(json.dumps(draw(json_values)).encode()).decode()
        query["skipToken"] = draw(st.sampled_from([token, token.rstrip("="), token[:-2] + "!!"]))
    query.pop("code", None)  # the host's own parameter (the function key)
    return query


@fuzz(150)
@given(data=st.data())
def test_any_uninvoiced_query_is_answered_200_or_a_400_problem(pworld, data):
    world = pworld
    query = data.draw(uninvoiced_queries(world))
    TALLY.tried("GET /api/bookings/uninvoiced")

    response = world.host.http("GET", "bookings/uninvoiced", params=query)

    parsed = check_answer(response, f"GET /api/bookings/uninvoiced {query!r}")
    if response.status_code == 200:
        assert set(parsed) == {"value", "nextLink"} and isinstance(parsed["value"], list)


route_segments = weird_text.filter(lambda t: t and "/" not in t and "?" not in t and "#" not in t)


@fuzz(60)
@given(job=st.one_of(route_segments, st.text(alphabet="0123456789abcdef", min_size=32, max_size=32),
                     st.just("known")))
def test_any_job_id_is_answered_200_404_or_400(pworld, job):
    world = pworld
    job = world.known_job if job == "known" else job
    TALLY.tried("GET /api/invoices/jobs/{jobId}")

    response = world.host.http("GET", f"invoices/jobs/{job}")

    parsed = check_answer(response, f"GET /api/invoices/jobs/{job!r}")
    if job == world.known_job:
        assert response.status_code == 200 and parsed["jobId"] == job


template_fields = st.sampled_from(["displayName", "city", "country", "currencyCode", "paymentTermsId", "creditLimit",
                                   "taxLiable", "blocked", "unitPrice", "baseUnitOfMeasureCode", "gtin", "type",
                                   "number", "id", "email"])
template_codes = st.one_of(st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.\-]{0,19}\Z"), route_segments)


@fuzz(100)
@given(kind=st.one_of(st.sampled_from(["customer", "item"]), route_segments), code=template_codes,
       raw=st.one_of(st.dictionaries(st.one_of(template_fields, st.text(max_size=10)),
                                     st.one_of(json_values, weird_text), max_size=5).map(encoded), raw_bodies),
       content_type=content_types)
def test_any_template_is_stored_as_validated_or_rejected_with_a_problem_and_nothing_written(pworld, kind, code, raw,
                                                                                             content_type):
    world = pworld
    before = table_state(world, (TEMPLATES,))
    TALLY.tried("PUT /api/templates/{kind}/{code}")

    response = world.host.http("PUT", f"templates/{kind}/{code}", body=raw, headers={"Content-Type": content_type})

    parsed = check_answer(response, f"PUT /api/templates/{kind!r}/{code!r}")
    if response.status_code >= 400:
        assert table_state(world, (TEMPLATES,)) == before, "a rejected template was written"
        return
    assert response.status_code == 200 and parsed["kind"] == kind and parsed["code"] == code
    listed = body(world.host.http("GET", "templates"))["value"]
    assert {"kind": kind, "code": code, "fields": parsed["fields"]} in [
        {k: t[k] for k in ("kind", "code", "fields")} for t in listed]
    assert "type" not in parsed["fields"], "a template cannot change the record type"


@fuzz(60)
@given(route=st.sampled_from([("POST", "sync"), ("GET", "templates"), ("GET", "health"), ("GET", "status"),
                              ("GET", "openapi.json")]),
       query=st.dictionaries(st.text(min_size=1, max_size=10).filter(lambda k: k != "code"), query_values,
                             max_size=3),
       raw=raw_bodies, content_type=content_types)
def test_the_other_routes_answer_any_query_and_body(pworld, route, query, raw, content_type):
    world = pworld
    method, path = route
    TALLY.tried(f"{method} /api/{path}")

    response = world.host.http(method, path, params=query, body=raw, headers={"Content-Type": content_type})

    parsed = check_answer(response, f"{method} /api/{path}")
    if path == "sync":
        assert response.status_code == 202 and parsed == {"status": "queued"}
    elif path == "openapi.json":
        assert response.status_code == 200 and parsed["openapi"].startswith("3.1")
    else:
        assert response.status_code == 200


# -- queue messages -------------------------------------------------------------------------------

def is_base64(text: str) -> bool:
    try:
        base64.b64decode(text, validate=True)
        return True
    except (binascii.Error, ValueError):
        return False


def poison_messages(world, queue: str) -> list[str]:
    return peek_raw(world, f"{queue}-poison")


def clear(world, queue: str) -> None:
    client = queue_client(world, queue)
    try:
        client.clear_messages()
    except Exception as error:
        if "QueueNotFound" not in str(error):
            raise
    finally:
        client.close()


emails = st.one_of(st.emails(), st.sampled_from(["Alice@Example.com", "alice@example.com", "ALICE@EXAMPLE.COM",
                                                 "o'brien@example.com", "x' or 1 eq 1 or email eq 'y@z"]),
                   weird_text)
customer_entries = st.fixed_dictionaries(
    {"kind": st.just("customer"), "customer": st.fixed_dictionaries(
        {"email": emails}, optional={"displayName": weird_text, "city": weird_text, "phone": weird_text}),
     "sourceHash": st.text(alphabet=string.hexdigits, max_size=70)})
item_entries = st.fixed_dictionaries(
    {"kind": st.just("item"), "service": st.fixed_dictionaries(
        {"serviceId": weird_text, "displayName": weird_text},
        optional={"defaultPrice": st.one_of(st.floats(), st.integers(), weird_text)}),
     "sourceHash": st.text(alphabet=string.hexdigits, max_size=70)})


def message_shapes(queue: str):
    near_valid = {
        "directory-upserts": st.one_of(
            customer_entries, item_entries,
            st.fixed_dictionaries({"kind": st.just("customers"), "customers": st.lists(customer_entries, max_size=3)}),
            st.fixed_dictionaries({"kind": st.just("items"), "services": st.lists(item_entries, max_size=3)})),
        "invoice-jobs": st.fixed_dictionaries(
            {"kind": st.sampled_from(["invoice", "sync", "x"]),
             "jobId": st.one_of(st.text(alphabet="0123456789abcdef", min_size=32, max_size=32), weird_text,
                                st.just("known"))},
            optional={"part": st.one_of(st.integers(min_value=-5, max_value=10**6), weird_text),
                      "parts": st.lists(st.integers(min_value=-5, max_value=200), max_size=60)}),
        "sync-requests": st.fixed_dictionaries(
            {}, optional={"kind": st.sampled_from(["sync", "invoice"]), "reason": weird_text,
                          "requestedAt": st.one_of(datetimes.map(lambda d: d.isoformat()), weird_text)}),
        "sync-businesses": st.fixed_dictionaries(
            {"kind": st.sampled_from(["business", "reconcile", "sync"]), "runId": st.one_of(st.just("r1"), weird_text)},
            optional={"businessId": st.one_of(st.just("known"), weird_text), "trigger": weird_text,
                      "requestedAt": st.one_of(datetimes.map(lambda d: d.isoformat()), weird_text)}),
    }[queue]
    return st.one_of(near_valid.map(json.dumps), json_values.map(json.dumps), weird_text)


def schema_accepts(queue: str, text: str) -> bool:
    schema = {"directory-upserts": directory_upsert.validate_json,
              "invoice-jobs": InvoiceJobPart.model_validate_json,
              "sync-requests": SyncRequest.model_validate_json, "sync-businesses": sync_part.validate_json}[queue]
    try:
        schema(text)
        return True
    except (ValidationError, ValueError):
        return False


def xml_safe(text: str) -> str:
    """What the queue service accepts as a raw (unencoded) message: XML character data. Azure
    refuses anything else when it is sent, so no producer can enqueue it."""
    return "".join(ch for ch in text if ch in "\t\n\r" or "\x20" <= ch <= "\ud7ff" or "\ue000" <= ch <= "\ufffd"
                   or ch >= "\U00010000")


def check_queue_message(world, queue: str, text: str, encode: bool) -> None:
    if not encode:
        text = xml_safe(text)
    if queue == "invoice-jobs":
        text = text.replace('"known"', json.dumps(world.known_job))
    if queue == "sync-businesses":
        text = text.replace('"known"', json.dumps(world.business_ids[0]))
    clear(world, f"{queue}-poison")
    before = table_state(world)
    TALLY.tried(f"queue {queue}")

    world.host.send(queue, text, encode=encode)
    world.host.drain(queues=[queue], timeout=60)

    poisoned = poison_messages(world, queue)
    decodable = encode or is_base64(text)
    if not decodable:
        # The host cannot decode it (host.json says base64): the host poisons it as it came.
        assert poisoned == [text], "an undecodable message was lost"
        assert table_state(world) == before
        return
    delivered = text if encode else base64.b64decode(text).decode("utf-8", errors="replace")
    valid = schema_accepts(queue, delivered)
    if not poisoned:
        assert valid, f"a {queue} message the schema rejects was neither processed nor poisoned: {delivered[:200]!r}"
        return
    assert len(poisoned) == 1
    record = json.loads(base64.b64decode(poisoned[0]))
    assert isinstance(record.get("reason"), str) and record["reason"].strip(), record
    assert record["queue"] == queue and "message" in record
    if not valid:
        assert "not a valid" in record["reason"], record["reason"]
        assert table_state(world) == before, "an invalid message wrote something"


@pytest.fixture(scope="module")
def quiet_sync_requests(pworld):
    """Valid sync requests run a sync each; the deferred ones come back after 1 s, not 30."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr("shared.web.blueprints.sync.RETRY_WHEN_BUSY_SECONDS", 1)
        yield


@pytest.mark.parametrize("queue", QUEUES)
def test_any_queue_message_is_processed_or_poisoned_with_a_reason_and_never_lost(pworld, quiet_sync_requests, queue):
    examples = {"directory-upserts": 30, "invoice-jobs": 30, "sync-requests": 15, "sync-businesses": 15}[queue]

    @fuzz(examples)
    @given(text=message_shapes(queue), encode=st.booleans())
    def run(text, encode):
        check_queue_message(pworld, queue, text, encode)

    run()
    pworld.host.drain()
    customers = [(c.get("email") or "").strip().lower() for c in pworld.bc.customers(pworld.company_id)]
    doubled = sorted({e for e in customers if e and customers.count(e) > 1})
    assert not doubled, f"BC customers exist twice by e-mail: {doubled}"
