"""Glue every queue-triggered function shares: the poison queue sender."""

from __future__ import annotations

from shared.runtime import runtime


async def send_to_poison(queue: str, body: str) -> None:
    store = await runtime().store()
    await store.send(f"{queue}-poison", body)
