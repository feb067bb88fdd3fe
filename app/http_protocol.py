"""uvicorn's h11 protocol with a request-head timeout (slow-header clients, "slowloris").

uvicorn times out only an idle keep-alive connection (``timeout_keep_alive``), and any byte
received cancels that timer; a connection that never completes a request head is never timed
out. HeadTimeoutH11Protocol arms one timer whenever the connection is waiting for a request
head (on connect, and after each response): if the head is still incomplete when it fires,
the connection is closed, with a ``408 Request Timeout`` when part of a head had arrived.
A request that is being read or answered is never cut by it. Slow *bodies* are not bounded
here (the app reads them as they come); a proxy or ingress timeout bounds those. It also
answers requests h11 cannot parse with the service's JSON error body, not plain text.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("tmc.http")
DEFAULT_HEAD_TIMEOUT_S = 10.0


def _timeout_response(seconds: float) -> bytes:
    body = json.dumps({"error": f"request head not received within {seconds:g} s"}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: " + str(len(body)).encode()
            + b"\r\n\r\n" + body)


class HeadTimeoutH11Protocol(H11Protocol):
    """H11Protocol that closes a connection whose request head is not complete within
    ``head_timeout`` seconds of the connection opening or of the previous response."""

    head_timeout: float = DEFAULT_HEAD_TIMEOUT_S
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 cannot parse (a malformed request line or
        header, a head over h11_max_incomplete_event_size), in the service's JSON shape
        instead of plain text."""
        body = json.dumps({"error": f"invalid HTTP request: {msg.rstrip('.')}: the request "
                           "line or headers are malformed or too large"}).encode()
        event = h11.Response(status_code=400, reason=b"Bad Request", headers=[
            (b"content-type", b"application/json"), (b"connection", b"close"),
            (b"content-length", str(len(body)).encode())])
        for part in (event, h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(part))
        self.transport.close()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        # a fresh context: not the finished request's (its request id would tag the log line)
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out,
                                                context=contextvars.Context())

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _waiting_for_head(self) -> bool:
        idle_cycle = self.cycle is None or self.cycle.response_complete
        return idle_cycle and self.conn.their_state is h11.IDLE

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._waiting_for_head():
            return  # a request is being read or answered: its response re-arms the timer
        partial, _ = self.conn.trailing_data
        if partial:  # part of a head came, then nothing for head_timeout seconds
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
            log.info("closed %s: request head incomplete after %g s", client,
                     self.head_timeout, extra={"event": "head_timeout"})
            self.transport.write(_timeout_response(self.head_timeout))
        self.transport.close()


def head_timeout_protocol(seconds: float) -> type[HeadTimeoutH11Protocol]:
    """The protocol class to pass as uvicorn's ``http=``, with its head timeout."""
    if not seconds > 0:
        raise ValueError(f"head timeout must be > 0, got {seconds}")
    return type("HeadTimeoutH11Protocol", (HeadTimeoutH11Protocol,),
                {"head_timeout": float(seconds)})
