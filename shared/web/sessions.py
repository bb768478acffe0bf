"""Sessions of the operator pages, kept server-side so that they can be ended.

The browser holds only a random session token, in a signed cookie. The table `pagesessions` holds
one row per session under the token's SHA-256 (someone who can read the table learns no token):
who signed in (`Principal`), when (`CreatedAt`), when they were last seen (`LastSeenAt`) and
when their app roles were last read from Entra ID (`RolesAt`). Every request of a page looks the
row up, so deleting it (sign-out) ends the session on every instance at once, and:
- a session unused for `IDLE_SECONDS` (30 minutes) ends;
- a session ends `ABSOLUTE_SECONDS` (8 hours) after sign-in, however busy;
- roles older than `ROLES_SECONDS` (1 hour) are not trusted: the pages read them again with a
  silent sign-in at Entra ID (`shared.web.signin`), so a removed role or a disabled account loses
  access within the hour.

Times are seconds since the epoch and every function takes the moment to judge by (`now`), so
tests and callers decide the clock."""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
import weakref
from dataclasses import dataclass

from azure.core.exceptions import ResourceNotFoundError

from shared.storage.store import SESSIONS, Store

log = logging.getLogger(__name__)

ROW = "session"
IDLE_SECONDS = 30 * 60
ABSOLUTE_SECONDS = 8 * 3600
ROLES_SECONDS = 3600
RENEW_SECONDS = 50 * 60
"""From this age on, a page view reads the roles again (silently) before they are too old for a form."""
TOUCH_SECONDS = 60
"""`LastSeenAt` is written at most this often per session (the idle timeout needs no finer grain)."""
PRUNE_EVERY_SECONDS = 3600


@dataclass(frozen=True)
class Principal:
    """A verified user, from an ID token the app validated."""
    oid: str
    tid: str
    name: str
    username: str
    roles: tuple[str, ...]
    guest: bool = False
    login_hint: str = ""
    """The ID token's optional `login_hint` claim (opaque): sent back as `logout_hint` at sign-out,
    so Entra ID ends this account's session without asking which one."""


@dataclass(frozen=True)
class Session:
    key: str
    """The SHA-256 of the session token (hex): the row's key, and what CSRF tokens are bound to."""
    principal: Principal
    created_at: float
    last_seen_at: float
    roles_at: float

    def roles_age(self, now: float) -> float:
        return now - self.roles_at


def token_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _session(row: dict) -> Session:
    principal = Principal(str(row.get("Oid") or ""), str(row.get("Tid") or ""), str(row.get("Name") or ""),
                          str(row.get("Username") or ""), tuple(json.loads(row.get("Roles") or "[]")),
                          bool(row.get("Guest")), str(row.get("LoginHint") or ""))
    return Session(row["PartitionKey"], principal, float(row["CreatedAt"]), float(row["LastSeenAt"]),
                   float(row["RolesAt"]))


async def start(store: Store, principal: Principal, now: float, created_at: float | None = None) -> tuple[str, Session]:
    """A new session for a user who just signed in; (its token, the session). `created_at`: when
    the session it renews began (a silent sign-in never extends the absolute timeout)."""
    token = secrets.token_urlsafe(32)
    row = {"PartitionKey": token_key(token), "RowKey": ROW, "Oid": principal.oid, "Tid": principal.tid,
           "Name": principal.name, "Username": principal.username, "Roles": json.dumps(list(principal.roles)),
           "Guest": principal.guest, "LoginHint": principal.login_hint, "CreatedAt": float(now if created_at is None else created_at),
           "LastSeenAt": float(now), "RolesAt": float(now)}
    await store.insert(SESSIONS, row)
    await prune(store, now)
    return token, _session(row)


async def renew(store: Store, old_key: str, principal: Principal, now: float) -> tuple[str, Session]:
    """A new session (new token) for a silent sign-in that re-read the user's roles, in place of
    the session `old_key`: the same user keeps its start time (the 8 hours still count from the
    first sign-in); another account starts afresh."""
    row = await store.get(SESSIONS, old_key, ROW)
    created = float(row["CreatedAt"]) if row and row.get("Oid") == principal.oid else None
    await _delete(store, old_key)
    if created is not None and now - created >= ABSOLUTE_SECONDS:
        created = None
    return await start(store, principal, now, created_at=created)


async def find(store: Store, token: str | None, now: float) -> tuple[Session | None, str | None]:
    """(the session of this token, None) or (None, why not: "none", "unknown", "idle", "expired").
    An idle or expired session is deleted; an active one is marked seen."""
    if not token:
        return None, "none"
    key = token_key(token)
    row = await store.get(SESSIONS, key, ROW)
    if row is None:
        return None, "unknown"
    session = _session(row)
    ended = "expired" if now - session.created_at >= ABSOLUTE_SECONDS else \
        "idle" if now - session.last_seen_at >= IDLE_SECONDS else None
    if ended:
        await _delete(store, key)
        log.info("pages session ended: %s", ended, extra={"event": "pages_session_ended", "reason": ended,
                                                         "user_oid": session.principal.oid})
        return None, ended
    if now - session.last_seen_at >= TOUCH_SECONDS:
        await store.upsert(SESSIONS, {"PartitionKey": key, "RowKey": ROW, "LastSeenAt": float(now)})
    return session, None


async def end(store: Store, key: str) -> None:
    """Sign-out: the session (by its key) no longer exists anywhere."""
    await _delete(store, key)


async def _delete(store: Store, key: str) -> None:
    try:
        await store.delete(SESSIONS, key, ROW)
    except ResourceNotFoundError:
        pass


_pruned: weakref.WeakKeyDictionary[Store, float] = weakref.WeakKeyDictionary()


async def prune(store: Store, now: float) -> int:
    """Delete sessions nobody can use any more (idle or past their lifetime), at most once an hour
    per process; returns how many."""
    if _pruned.get(store, float("-inf")) > time.monotonic():
        return 0
    _pruned[store] = time.monotonic() + PRUNE_EVERY_SECONDS
    stale = await store.query(SESSIONS, "LastSeenAt lt @idle or CreatedAt lt @absolute", ["PartitionKey"],
                              {"idle": float(now - IDLE_SECONDS), "absolute": float(now - ABSOLUTE_SECONDS)})
    for row in stale:
        await _delete(store, row["PartitionKey"])
    return len(stale)
