"""The Redis change feed: a daemon thread that delivers ``<prefix>events`` messages."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis
from redis.client import PubSub

log = logging.getLogger(__name__)


class RedisListener:
    """A daemon thread delivering ``P events`` messages to a callback until closed."""

    def __init__(self, client: redis.Redis, channel: str,
                 on_message: Callable[[str], None]) -> None:
        self._on_message = on_message
        self._stop = threading.Event()
        self._pubsub: PubSub = client.pubsub(  # type: ignore[no-untyped-call]
            ignore_subscribe_messages=True)
        self._pubsub.subscribe(channel)
        self._thread = threading.Thread(target=self._loop, name="tmc-registry-events",
                                        daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                message = self._pubsub.get_message(timeout=0.05)
            except (redis.RedisError, OSError, ValueError):
                self._stop.wait(0.5)  # redis-py reconnects and resubscribes on the next call
                continue
            if message and message.get("type") == "message":
                self._deliver(bytes(message["data"]).decode())

    def _deliver(self, text: str) -> None:
        try:
            self._on_message(text)
        except Exception:
            log.exception("registry event handler failed")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._pubsub.close()
