"""Glue every queue-triggered function shares: the poison queue sender, and the sender of
messages deferred for later."""

from __future__ import annotations

from shared.runtime import runtime


async def send_to_poison(queue: str, body: str) -> None:
    store = await runtime().store()
    await store.send(f"{queue}-poison", body)


async def send_later(queue: str, body: str, seconds: int) -> None:
    store = await runtime().store()
    await store.send(queue, body, visibility_timeout=seconds)
