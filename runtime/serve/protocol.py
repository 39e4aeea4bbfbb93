"""uvicorn's h11 protocol with a deadline on each request's headers.

uvicorn waits for headers forever, so a client that sends a byte a minute holds a connection
(slowloris). The deadline runs from the connection (or the next request's first byte on a
keep-alive connection) to the end of the headers; past it the client gets a 408 and the connection
closes. The body's deadline and the headers' size are RequestLimits' (app.py), and h11's
max_incomplete_event_size.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from sdrt.serve.errors import error_body


def _timeout_response(read_timeout_s: float) -> bytes:
    # the request line is not read yet: A1111's shape
    body = json.dumps(error_body("/", 408, f"the request's headers took over {read_timeout_s:g} s")).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n" % len(body)) + body


def with_header_deadline(read_timeout_s: float) -> type[H11Protocol]:
    """An H11Protocol class (uvicorn.Config(http=...)) that allows read_timeout_s for each request's headers."""

    class HeaderDeadline(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._between_requests():  # the first bytes of the next request on a kept-alive connection
                self._arm()
            super().data_received(data)
            if not self._between_requests():  # its headers are complete: the app has the request
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            if self._deadline is None:
                self._deadline = self.loop.call_later(read_timeout_s, self._late)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _late(self) -> None:
            self._deadline = None
            if self._between_requests() and not self.transport.is_closing():
                self.transport.write(_timeout_response(read_timeout_s))
                self.transport.close()

    return HeaderDeadline
