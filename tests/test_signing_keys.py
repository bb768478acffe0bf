"""The keys the pages sign cookies and CSRF tokens with: in a container of their own, rotated (a
list, newest first, old sessions keep working until they expire), never shorter than 32 bytes."""

from __future__ import annotations

import base64
import json
import time

from azure.storage.blob import BlobServiceClient

from shared.web import signing_keys
from shared.web.signin import session_cookie, session_token
from shared.web.signing_keys import (ACTIVATE_SECONDS, KEYS_BLOB, KEYS_CONTAINER, LEGACY_KEY_BLOB, MIN_KEY_BYTES,
                                 RETAIN_SECONDS, ROTATE_AFTER_SECONDS)
from shared.storage.store import CONTAINER
from tests.signin_helpers import Browser

DAY = 86400


def blobs(world) -> BlobServiceClient:
    return BlobServiceClient.from_connection_string(world.sandbox.azurite.connection_string)


def stored(world) -> list[dict]:
    data = blobs(world).get_blob_client(KEYS_CONTAINER, KEYS_BLOB).download_blob().readall()
    return json.loads(data)["keys"]


def plant(world, keys: list[tuple[bytes, float]]) -> None:
    body = json.dumps({"keys": [{"key": base64.b64encode(k).decode(), "created": c} for k, c in keys]})
    container = blobs(world).get_container_client(KEYS_CONTAINER)
    if not container.exists():
        container.create_container()
    container.get_blob_client(KEYS_BLOB).upload_blob(body, overwrite=True)


def keys_at(world, now: float):
    async def read():
        from shared.runtime import runtime

        return await signing_keys.signing_keys(await runtime().store(), now)

    return world.host.run(read(), 30)


def test_the_first_key_is_random_32_bytes_in_the_apps_own_container_and_the_old_blob_is_gone(world):
    bookkeeping = blobs(world).get_container_client(CONTAINER)
    if not bookkeeping.exists():
        bookkeeping.create_container()
    legacy = bookkeeping.get_blob_client(LEGACY_KEY_BLOB)
    legacy.upload_blob(b"", overwrite=True)

    keys = keys_at(world, time.time())

    [entry] = stored(world)
    assert len(base64.b64decode(entry["key"])) == 32 and keys.signing == base64.b64decode(entry["key"])
    assert not legacy.exists(), "the key others could read is deleted"
    assert KEYS_CONTAINER != CONTAINER


def test_keys_rotate_and_sessions_signed_with_the_old_key_keep_working(world):
    now = time.time()
    old = b"o" * 32
    plant(world, [(old, now - ROTATE_AFTER_SECONDS - 60)])
    before = keys_at(world, now - 120)
    cookie = session_cookie("a-session-token", before, secure=False).split(";")[0]

    rotated = keys_at(world, now)
    soon = keys_at(world, now + ACTIVATE_SECONDS + 1)

    assert [base64.b64decode(k["key"]) for k in stored(world)][1:] == [old], "a new key in front, newest first"
    assert rotated.signing == old, "a new key signs nothing until every instance has read it"
    assert soon.signing != old and old in soon.keys
    assert session_token(cookie, soon, secure=False) == "a-session-token", "an old session still works"
    later = keys_at(world, now + RETAIN_SECONDS + 60)
    assert old not in later.keys and session_token(cookie, later, secure=False) is None, \
        "once no session can still use it, the old key is gone"


def test_a_key_shorter_than_32_bytes_is_refused_and_replaced(world):
    now = time.time()
    short = b"s" * (MIN_KEY_BYTES - 1)
    plant(world, [(short, now - DAY), (b"", now - 2 * DAY)])

    keys = keys_at(world, now)

    assert short not in keys.keys and all(len(k) >= MIN_KEY_BYTES for k in keys.keys)
    forged = session_cookie("forged", signing_keys.SigningKeys((short,), short), secure=False).split(";")[0]
    assert session_token(forged, keys, secure=False) is None, "a cookie signed with a short key is refused"
    assert all(len(base64.b64decode(k["key"])) >= MIN_KEY_BYTES for k in stored(world))


def test_an_unreadable_key_list_is_replaced_and_the_pages_still_work(world):
    plant(world, [])
    blobs(world).get_blob_client(KEYS_CONTAINER, KEYS_BLOB).upload_blob(b"not json", overwrite=True)
    keys_at(world, time.time())
    assert len(stored(world)) == 1
    assert Browser(world).get("pages/jobs").status_code == 200
