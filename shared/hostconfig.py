"""The queue settings of `host.json`, which the app must agree with.

The Functions host decodes queue messages as `messageEncoding` says and moves a message to
`<queue>-poison` after `maxDequeueCount` failed attempts; the app encodes what it enqueues the
same way and records a readable reason on the last attempt."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

HOST_JSON = Path(__file__).resolve().parent.parent / "host.json"


@dataclass(frozen=True)
class QueueSettings:
    message_encoding: str = "base64"
    batch_size: int = 16
    new_batch_threshold: int = 8
    max_dequeue_count: int = 5
    visibility_timeout_seconds: float = 0.0
    max_polling_interval_seconds: float = 60.0


def _seconds(timespan: str) -> float:
    hours, minutes, seconds = timespan.split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


@lru_cache(maxsize=1)
def queue_settings() -> QueueSettings:
    try:
        queues = json.loads(HOST_JSON.read_text())["extensions"]["queues"]
    except (OSError, KeyError, ValueError):
        return QueueSettings()
    defaults = QueueSettings()
    return QueueSettings(
        message_encoding=queues.get("messageEncoding", defaults.message_encoding).lower(),
        batch_size=int(queues.get("batchSize", defaults.batch_size)),
        new_batch_threshold=int(queues.get("newBatchThreshold", defaults.new_batch_threshold)),
        max_dequeue_count=int(queues.get("maxDequeueCount", defaults.max_dequeue_count)),
        visibility_timeout_seconds=_seconds(queues.get("visibilityTimeout", "00:00:00")),
        max_polling_interval_seconds=_seconds(queues.get("maxPollingInterval", "00:01:00")),
    )
