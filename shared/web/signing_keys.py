"""The keys the operator pages sign their cookies and CSRF tokens with.

They live in a blob container of their own, `pages-keys`, that only the app's identity may read:
the Bicep gives the person running azd blob access to the app's bookkeeping container alone, and
the storage account takes no shared keys (infra/app/rbac.bicep). Nothing else keeps a copy.

Keys rotate: the blob holds a list, newest first, each with the time it was made. Cookies are
signed with the newest key that every instance has had time to read (`ACTIVATE_SECONDS`), and
checked against every key in the list, so a session signed before a rotation keeps working until
it expires; a key is dropped once no session signed with it can still be alive. A key shorter
than `MIN_KEY_BYTES` is never used (an empty or truncated blob is not a key): it is dropped, and
a new key made if none is left."""

from __future__ import annotations

import base64
import json
import logging
import secrets
import time
import weakref
from dataclasses import dataclass

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.storage.blob import ContentSettings

from shared.storage.store import Store

log = logging.getLogger(__name__)

KEYS_CONTAINER = "pages-keys"
KEYS_BLOB = "signing-keys.json"
LEGACY_KEY_BLOB = "pages/signing-key"
"""Where an earlier version kept a single key, in the bookkeeping container others may read: deleted."""
MIN_KEY_BYTES = 32
NEW_KEY_BYTES = 32
ROTATE_AFTER_SECONDS = 30 * 86400
ACTIVATE_SECONDS = 600
"""A new key signs nothing until it is this old: by then every instance has read it."""
REREAD_SECONDS = 300
RETAIN_SECONDS = 8 * 3600 + 3600
"""How long a key is kept after a newer one replaced it: the longest a session (8 h) or a sign-in
flow can outlive the key that signed it, with a margin."""


@dataclass(frozen=True)
class SigningKeys:
    keys: tuple[bytes, ...]
    """Every key a cookie may be signed with, newest first."""
    signing: bytes
    """The key new cookies are signed with."""

    @property
    def oldest_first(self) -> list[bytes]:
        """For itsdangerous, which signs with the last key of its list and accepts any."""
        return list(reversed(self.keys))


@dataclass(frozen=True)
class _Key:
    key: bytes
    created: float

    def as_dict(self) -> dict:
        return {"key": base64.b64encode(self.key).decode(), "created": self.created}


_cache: weakref.WeakKeyDictionary[Store, tuple[float, SigningKeys]] = weakref.WeakKeyDictionary()


def _parse(data: bytes | None) -> list[_Key]:
    """The stored keys, newest first; an unreadable list or entry counts as none."""
    if not data:
        return []
    try:
        entries = json.loads(data)["keys"]
    except (ValueError, KeyError, TypeError):
        log.warning("the pages' signing-key list is unreadable: a new one is made",
                    extra={"event": "pages_keys_unreadable"})
        return []
    keys = []
    for entry in entries if isinstance(entries, list) else []:
        try:
            key, created = base64.b64decode(entry["key"], validate=True), float(entry["created"])
        except (ValueError, KeyError, TypeError):
            continue
        if len(key) < MIN_KEY_BYTES:
            log.warning("a pages signing key shorter than %d bytes is refused", MIN_KEY_BYTES,
                        extra={"event": "pages_key_refused", "key_bytes": len(key)})
            continue
        keys.append(_Key(key, created))
    return sorted(keys, key=lambda k: k.created, reverse=True)


def _kept(keys: list[_Key], now: float) -> list[_Key]:
    """Drop the keys no live session can have been signed with; add a new key when due."""
    kept = [key for index, key in enumerate(keys) if index == 0 or keys[index - 1].created > now - RETAIN_SECONDS]
    if not kept or kept[0].created <= now - ROTATE_AFTER_SECONDS:
        kept.insert(0, _Key(secrets.token_bytes(NEW_KEY_BYTES), now))
    return kept


def _in_use(keys: list[_Key], now: float) -> SigningKeys:
    active = next((key for key in keys if key.created <= now - ACTIVATE_SECONDS), keys[-1])
    return SigningKeys(tuple(key.key for key in keys), active.key)


async def _load(store: Store, now: float) -> SigningKeys:
    container = store.blobs.get_container_client(KEYS_CONTAINER)
    try:
        await container.create_container()
    except ResourceExistsError:
        pass
    blob = container.get_blob_client(KEYS_BLOB)
    for _ in range(5):
        try:
            download = await blob.download_blob()
            data, etag = await download.readall(), download.properties.etag
        except ResourceNotFoundError:
            data, etag = None, None
        stored = _parse(data)
        kept = _kept(stored, now)
        if kept == stored:
            return _in_use(kept, now)
        body = json.dumps({"keys": [key.as_dict() for key in kept]}).encode()
        conditions = {"etag": etag, "match_condition": MatchConditions.IfNotModified} if etag else {}
        try:
            await blob.upload_blob(body, overwrite=etag is not None,
                                   content_settings=ContentSettings(content_type="application/json"), **conditions)
        except (ResourceExistsError, ResourceModifiedError):
            continue  # another instance rotated at the same moment: read theirs
        store.stats.blob_writes += 1
        log.info("pages signing keys rotated", extra={"event": "pages_keys_rotated", "keys": len(kept)})
        if not stored:
            await _delete_legacy_key(store)
        return _in_use(kept, now)
    raise RuntimeError("the pages' signing keys kept changing under this instance")


async def _delete_legacy_key(store: Store) -> None:
    try:
        await store.blob(LEGACY_KEY_BLOB).delete_blob()
    except ResourceNotFoundError:
        pass


async def signing_keys(store: Store, now: float | None = None) -> SigningKeys:
    """The keys in force, read at most every `REREAD_SECONDS` per process and store (`now`, for a
    moment other than the present, reads them afresh). Instances that read or rotate at the same
    time agree through the blob's ETag."""
    cached = _cache.get(store)
    if now is None and cached and cached[0] > time.monotonic():
        return cached[1]
    keys = await _load(store, time.time() if now is None else now)
    _cache[store] = (time.monotonic() + REREAD_SECONDS, keys)
    return keys
