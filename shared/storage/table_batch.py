"""Entity group transactions (Table Storage `$batch`) without the SDK's multipart machinery.

`azure-data-tables` builds a transaction as one `azure.core` request per operation, serialises
each through `http.client` and the whole through the `email` package, and parses the answer the
same way: about 0.27 ms of CPU per entity on the reference machine, half of a first sync's CPU
(`bench/README.md`, "Where the CPU goes"). The wire format is small and documented ("Performing
entity group transactions": a `multipart/mixed` batch holding one changeset of `application/http`
requests, answered by one `multipart/mixed` response of the same shape), so this module writes it
directly, as the SDK writes it, and reads the answer: about a tenth of the CPU.

What stays the SDK's: the request pipeline of the table client (authentication, retries,
transport), through which the batch is sent, and the entity serialisation for anything but the
plain types the app stores (`_add_entity_properties`: Int64, GUIDs, binary…); strings, booleans,
32-bit integers, doubles and datetimes are written as the SDK writes them (the type annotation of
a string, which is the default, left out). Errors are the SDK's:
`TableTransactionError` (with `error_code`, e.g. `EntityAlreadyExists`,
`UpdateConditionNotSatisfied`) when an operation fails, the status-mapped `azure.core` errors when
the batch as a whole is refused."""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from urllib.parse import quote

import orjson

from azure.core import MatchConditions
from azure.core.rest import HttpRequest
from azure.data.tables import TableTransactionError, UpdateMode
from azure.data.tables._error import _decode_error  # the SDK's own mapping of a refused batch
from azure.data.tables._serialize import _add_entity_properties  # the SDK's entity wire format
from azure.data.tables.aio import TableClient

CRLF = "\r\n"
DATA_SERVICE_VERSION = "3.0"
_URL_UNSAFE = re.compile(r"[^A-Za-z0-9_.~-]+")
_INT32 = range(-(2**31), 2**31)


def _key(value: str) -> str:
    """A PartitionKey or RowKey inside an entity URL: quotes doubled, then percent-encoded."""
    if not isinstance(value, str):
        raise TypeError("PartitionKey or RowKey must be of type string.")
    return _URL_UNSAFE.sub(lambda run: quote(run.group(0).replace("'", "''"), safe=""), value)


def _properties(entity: dict) -> dict:
    """The entity as the Table service takes it: what needs an Edm type annotated with it."""
    out: dict = {}
    for name, value in entity.items():
        kind = type(value)
        if kind is str or kind is bool:
            out[name] = value
        elif kind is int and value in _INT32:
            out[name] = value
        elif kind is float and math.isfinite(value):
            out[name], out[f"{name}@odata.type"] = value, "Edm.Double"
        elif isinstance(value, datetime):
            # As the SDK: in UTC (a naive time is taken as local), to the microsecond.
            stamp = value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            out[name], out[f"{name}@odata.type"] = stamp, "Edm.DateTime"
        elif value is None:
            continue
        else:  # Int64, GUIDs, binary, enums, NaN…: the SDK's own conversion
            out |= _add_entity_properties({name: value})
    return out


def _if_match(options: dict, default: str | None) -> str | None:
    if options.get("match_condition") == MatchConditions.IfNotModified:
        etag = options.get("etag")
        if not etag:
            raise ValueError("IfNotModified must be specified with etag.")
        return etag if etag.startswith(("W/", '"')) else f'"{etag}"'
    return default


def _operation(base: str, table: str, version: str, operation: tuple) -> str:
    """One operation as the `application/http` part the SDK sends for it."""
    kind, entity = str(getattr(operation[0], "value", operation[0])).lower(), operation[1]
    options = operation[2] if len(operation) > 2 else {}
    if kind not in ("create", "upsert", "update", "delete"):
        raise ValueError(f"Unrecognized operation: {operation[0]}")
    address = f"{base}/{table}(PartitionKey='{_key(entity['PartitionKey'])}',RowKey='{_key(entity['RowKey'])}')"
    headers = {}
    if kind == "create":
        method, url, accept = "POST", f"{base}/{table}", "application/json;odata=minimalmetadata"
    elif kind == "delete":
        method, url, accept = "DELETE", address, "application/json;odata=minimalmetadata"
        headers["If-Match"] = _if_match(options, "*")
    else:
        replace = str(getattr(options.get("mode"), "value", options.get("mode"))).lower() == UpdateMode.REPLACE.value
        method, url, accept = ("PUT" if replace else "PATCH"), address, "application/json"
        if kind == "update":
            headers["If-Match"] = _if_match(options, "*")
    body = "" if kind == "delete" else orjson.dumps(_properties(entity)).decode()
    lines = [f"{method} {url} HTTP/1.1"]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body.encode())}"]
    lines += [f"x-ms-version: {version}", f"DataServiceVersion: {DATA_SERVICE_VERSION}", f"Accept: {accept}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return CRLF.join(lines) + CRLF + CRLF + body


def body(base: str, table: str, version: str, operations: Sequence[tuple], batch: str, changeset: str) -> bytes:
    """The `multipart/mixed` body of a batch holding one changeset of `operations`."""
    parts = [f"--{batch}", f"Content-Type: multipart/mixed; boundary={changeset}", ""]
    for index, operation in enumerate(operations):
        parts += [f"--{changeset}", "Content-Type: application/http", "Content-Transfer-Encoding: binary",
                  f"Content-ID: {index}", "", _operation(base, table, version, operation)]
    parts += [f"--{changeset}--", "", f"--{batch}--", ""]
    return CRLF.join(parts).encode()


def _boundary(content_type: str) -> str:
    for parameter in content_type.split(";")[1:]:
        name, _, value = parameter.strip().partition("=")
        if name.lower() == "boundary":
            return value.strip('"')
    raise ValueError(f"a multipart answer without a boundary ({content_type!r})")


def _parts(content: bytes, boundary: str) -> list[bytes]:
    """The parts of a `multipart/mixed` body (RFC 2046): between `--boundary` lines, up to
    `--boundary--`, each without the line break that belongs to its delimiter."""
    delimiter = b"--" + boundary.encode()
    chunks = content.split(delimiter)
    parts = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break
        chunk = chunk.removeprefix(b"\r\n").removeprefix(b"\n")
        parts.append(chunk.removesuffix(b"\n").removesuffix(b"\r"))
    return parts


def _split_headers(block: bytes) -> tuple[list[str], bytes]:
    """Header lines and what follows the blank line after them."""
    for separator in (b"\r\n\r\n", b"\n\n"):
        head, found, rest = block.partition(separator)
        if found:
            return head.decode("latin-1").splitlines(), rest
    return block.decode("latin-1").splitlines(), b""


def _header_map(lines: list[str]) -> dict[str, str]:
    headers = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    return headers


_STATUS = re.compile(r"HTTP/\d\.\d (\d{3}) ?([^\r\n]*)")
_ETAG = re.compile(r"^etag:[ \t]*([^\r\n]*)", re.IGNORECASE | re.MULTILINE)


class _Answer:
    """One operation's answer inside the changeset response: its status, ETag and body."""

    def __init__(self, part: bytes):
        outer, inner = _split_headers(part)
        if _header_map(outer).get("content-type", "").split(";")[0].strip().lower() != "application/http":
            raise ValueError("a transaction answer part that is not application/http")
        head, blank, self.body = inner.partition(b"\r\n\r\n")
        if not blank:
            head, _, self.body = inner.partition(b"\n\n")
        text = head.decode("latin-1")
        status = _STATUS.match(text)
        if status is None:
            raise ValueError(f"a transaction answer without a status line ({text[:40]!r})")
        self.status, self.reason = int(status.group(1)), status.group(2)
        self.text = text
        etag = _ETAG.search(text)
        self.etag = etag.group(1).strip() if etag else None

    def error(self) -> TableTransactionError:
        headers = _header_map(self.text.splitlines()[1:])
        code, message = headers.get("x-ms-error-code"), self.reason
        try:
            detail = json.loads(self.body) if self.body.strip() else {}
        except ValueError:
            detail = {}
        odata = detail.get("odata.error") if isinstance(detail, dict) else None
        if isinstance(odata, dict):
            code = odata.get("code") or code
            text = odata.get("message")
            message = text.get("value", message) if isinstance(text, dict) else str(text or message)
        error = TableTransactionError(message=f"{message}\nErrorCode:{code}")
        error.error_code, error.status_code, error.reason = code, self.status, self.reason
        error.additional_info = {}
        return error


async def submit(client: TableClient, operations: Sequence[tuple]) -> list[dict]:
    """Run `operations` (`(kind, entity[, options])` as `TableClient.submit_transaction` takes
    them: all of one partition, at most 100) as one transaction; each operation's answer
    (`{"etag": …}`), in order."""
    partitions = {operation[1]["PartitionKey"] for operation in operations}
    if len(partitions) > 1:
        raise ValueError("Partition Keys in the batch must all be the same.")
    # The table client's own address, version and pipeline (what its submit_transaction uses).
    base = f"{client.scheme}://{client._primary_hostname}"
    version = client.api_version
    batch, changeset = f"batch_{uuid.uuid4()}", f"changeset_{uuid.uuid4()}"
    request = HttpRequest("POST", f"{base}/$batch", headers={
        "x-ms-version": version, "DataServiceVersion": DATA_SERVICE_VERSION, "MaxDataServiceVersion": "3.0;NetFx",
        "Content-Type": f"multipart/mixed; boundary={batch}", "Accept": "application/json"},
        content=body(base, client.table_name, version, operations, batch, changeset))
    response = await client._client.send_request(request, stream=True)
    await response.read()  # streamed, so the pipeline does not try to decode multipart as JSON
    if response.status_code != 202:
        raise _decode_error(response)
    outer = _parts(response.content, _boundary(response.headers.get("content-type", "")))
    if len(outer) != 1:
        raise ValueError(f"a transaction answer of {len(outer)} parts (expected one changeset)")
    head, rest = _split_headers(outer[0])
    content_type = _header_map(head).get("content-type", "")
    if content_type.lower().startswith("application/http"):
        answers = [_Answer(outer[0])]  # the batch failed as a whole, answered by one part
    else:
        answers = [_Answer(part) for part in _parts(rest, _boundary(content_type))]
    failed = next((answer for answer in answers if not 200 <= answer.status < 300), None)
    if failed is not None:
        raise failed.error()
    if len(answers) != len(operations):
        raise ValueError(f"{len(answers)} answers to a transaction of {len(operations)} operations")
    return [{"etag": answer.etag} if answer.etag else {} for answer in answers]
