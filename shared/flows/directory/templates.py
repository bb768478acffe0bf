"""Templates (`PUT /api/templates/{kind}/{code}`): the defaults a new BC customer or item gets,
checked against the fields BC takes, named by `CUSTOMER_TEMPLATE` / `ITEM_TEMPLATE`."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

from pydantic import ValidationError

from shared.flows.directory.links import Kind
from shared.flows.messages import PermanentFailure
from shared.storage.store import TEMPLATES, Store, encode_key, to_json
from shared.upstream.bc import TEMPLATE_FIELDS


class TemplateNotFound(PermanentFailure):
    pass


_template_cache: dict[tuple, tuple[float, dict]] = {}
TEMPLATE_CACHE_SECONDS = 15.0


async def get_template(store: Store, kind: str, code: str) -> dict | None:
    row = await store.get(TEMPLATES, kind, encode_key(code))
    return json.loads(row["Fields"]) if row else None


async def template_defaults(store: Store, kind: Kind, code: str | None) -> dict:
    """The defaults of the template named in settings; {} when none is named."""
    if not code:
        return {}
    cache_key = (id(store), kind.name, code)
    cached = _template_cache.get(cache_key)
    if cached and cached[0] > time.monotonic():
        return cached[1]
    fields = await get_template(store, kind.name, code)
    if fields is None:
        raise TemplateNotFound(f"The {kind.name} template '{code}' named in {kind.setting} does not exist; "
                               f"create it with PUT /api/templates/{kind.name}/{code}.")
    _template_cache[cache_key] = (time.monotonic() + TEMPLATE_CACHE_SECONDS, fields)
    return fields


class InvalidTemplate(ValueError):
    """A template names fields a template may not set, or values BC would refuse; `problems`
    are (field, message) pairs, for an HTTP problem or a form's inline errors."""

    def __init__(self, problems: list[tuple[str, str]]):
        super().__init__("The template is not valid: " + "; ".join(message for _, message in problems) + ".")
        self.problems = problems


def validate_template(kind: str, body: object) -> dict:
    """The template's fields as BC takes them (`CustomerFields` / `ItemFields`), or `InvalidTemplate`."""
    try:
        return TEMPLATE_FIELDS[kind].model_validate(body).model_dump(exclude_none=True)
    except ValidationError as error:
        problems = []
        for item in error.errors()[:20]:
            name = ".".join(str(part) for part in item["loc"])
            message = (f"'{name}' is not a field a {kind} template may set"
                       if item["type"] == "extra_forbidden" else item["msg"])
            problems.append((name, message))
        raise InvalidTemplate(problems) from None


async def put_template(store: Store, kind: str, code: str, fields: dict) -> dict:
    now = datetime.now(timezone.utc)
    await store.upsert(TEMPLATES, {"PartitionKey": kind, "RowKey": encode_key(code), "Code": code,
                                   "Fields": to_json(fields), "UpdatedAt": now}, merge=False)
    _template_cache.clear()
    return {"kind": kind, "code": code, "fields": fields, "updatedAt": now}


async def list_templates(store: Store) -> list[dict]:
    rows = await store.query(TEMPLATES)
    return [{"kind": row["PartitionKey"], "code": row.get("Code") or row["RowKey"],
             "fields": json.loads(row.get("Fields") or "{}"), "updatedAt": row.get("UpdatedAt")}
            for row in sorted(rows, key=lambda r: (r["PartitionKey"], r["RowKey"]))]
