"""What an unauthenticated peer may cost the server, enforced below the app where the app cannot see it.

- ``GuardedWebSocketProtocol``: uvicorn's sans-I/O WebSocket protocol whose maximum message size starts at the HELLO
  limit (1 KiB by default): a 60 MiB first message is refused from its frame header (close 1009), nothing buffered.
  After authentication the app raises the limit through the ``taskcodec.max_message_size`` scope extension.
- ``GuardedH11Protocol``: uvicorn's h11 HTTP protocol with a deadline for the request line and headers (slowloris);
  h11 itself bounds their size (``h11_max_incomplete_event_size``), uvicorn closes idle keep-alive connections
  (``timeout_keep_alive``), the app bounds body time and size.
- ``ConnectionGate``: unauthenticated WebSocket connections per peer address and in total (the app asks it before
  accepting the upgrade; a refused peer gets HTTP 403 and costs nothing more).

The picows stream front end (server/stream.py) applies the same limits to /v1/stream connections.

Their settings come from ``config.taskcodec_limits`` on the uvicorn Config (a picklable pydantic model, so it reaches
``--workers`` processes too).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from taskcodec.server.auth import RateLimitedLog
from taskcodec.server.config import Limits

log = logging.getLogger("taskcodec.server.limits")
_over_limit = RateLimitedLog(log)
MAX_SIZE_EXTENSION = "taskcodec.max_message_size"


def _limits(config) -> Limits:
    return getattr(config, "taskcodec_limits", None) or Limits()


class GuardedWebSocketProtocol(WebSocketsSansIOProtocol):
    def __init__(self, config, server_state, app_state, _loop=None):
        super().__init__(config, server_state, app_state, _loop)
        # websockets reads these before parsing every frame: the first message may be at most a HELLO
        self.conn.max_message_size = _limits(config).max_hello_bytes

    def handle_connect(self, event) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:  # the upgrade was accepted; the app's task has not run yet
            scope["extensions"][MAX_SIZE_EXTENSION] = {"set": self._set_max_size}

    def _set_max_size(self, size: int) -> None:
        self.conn.max_message_size = size

    # Messages queued for the app before reading pauses (backpressure against a peer that does not wait for replies).
    MAX_QUEUED = 4

    def send_receive_event_to_app(self) -> None:
        # uvicorn pauses reading after every message until the app has taken it (and resumes in receive()): two
        # epoll_ctl system calls per message. A camera has one message in flight (it waits for the ACK), so pause
        # only when messages pile up; receive() still resumes a paused connection once the queue is empty.
        paused = self.read_paused
        self.read_paused = True  # the base class then skips its own pause_reading()
        try:
            super().send_receive_event_to_app()
        finally:
            self.read_paused = paused
        if not paused and self.queue.qsize() >= self.MAX_QUEUED:
            self.read_paused = True
            self.transport.pause_reading()


class GuardedH11Protocol(H11Protocol):
    """Closes a connection whose request line + headers do not arrive within ``http_header_timeout_s`` of the
    connection (or of the previous response, on keep-alive)."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer = None
        limit = _limits(self.config).max_connections
        if len(self.connections) > limit:  # every open HTTP and WebSocket connection of this process counts
            _over_limit.warning("max_connections", f"refusing connections: {limit} open (limits.max_connections)")
            transport.close()
            return
        self._arm()

    def _arm(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
        self._armed_cycle = self.cycle
        self._header_timer = self.loop.call_later(_limits(self.config).http_header_timeout_s, self._header_deadline)

    def _header_deadline(self) -> None:
        self._header_timer = None
        transport = self.transport
        if transport is None or transport.is_closing() or transport.get_protocol() is not self:
            return  # closed, or upgraded to a WebSocket (which has its own HELLO deadline)
        if self.cycle is self._armed_cycle:  # no complete request head since the timer was armed
            log.info("closing %s: no complete HTTP request head within %.0f s",
                     "%s:%d" % self.client if self.client else "?", _limits(self.config).http_header_timeout_s)
            transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)


class ConnectionGate:
    """Counts unauthenticated connections per address and in total (one event loop: no lock needed for the loop,
    a lock anyway for tests that call it from threads)."""

    def __init__(self, per_address: int, total: int):
        self.per_address, self.total = per_address, total
        self._pending: Counter[str] = Counter()
        self._lock = threading.Lock()

    def admit(self, address: str) -> str | None:
        """Take a pending slot; None if admitted, else which limit refused it."""
        with self._lock:
            if sum(self._pending.values()) >= self.total:
                return "pending_total"
            if self._pending[address] >= self.per_address:
                return "pending_per_address"
            self._pending[address] += 1
            return None

    def release(self, address: str) -> None:
        with self._lock:
            self._pending[address] -= 1
            if self._pending[address] <= 0:
                del self._pending[address]

    def pending(self) -> int:
        with self._lock:
            return sum(self._pending.values())


def raise_max_size(scope: dict, size: int) -> bool:
    """After authentication: let this WebSocket connection receive messages up to ``size`` bytes."""
    ext = scope.get("extensions", {}).get(MAX_SIZE_EXTENSION)
    if ext is None:
        return False
    ext["set"](size)
    return True
