"""What one client may hold of the server: connection limits and bounded logging.

uvicorn's h11 protocol closes an idle kept-alive connection, but it never times out a
connection that sends nothing, or part of its headers, or part of its body, and it accepts
connections until the process runs out of file descriptors (asyncio then logs "Too many open
files" thousands of times a second). `LimitedH11` adds to it, as production servers set them:

- a header timeout: a request's line and headers must be complete ``header_timeout`` seconds
  after the connection opened (or after the first byte of a kept-alive connection's next
  request); else the connection is closed, with a 408 if part of a request came;
- a body timeout: the body must be complete ``body_timeout`` seconds after the headers; else
  a 408 (when no response was started) and the connection is closed;
- uvicorn's own keep-alive timeout for idle connections between requests;
- a cap of ``max_connections`` open connections: one more is answered at once with a 503 in
  OpenAI's error shape (``code: too_many_connections``, ``Retry-After: 1``) and closed.

`plan_connections` fits the cap and the listening backlog under the open-file limit. `RateLimit`
is a logging filter that lets each message through a few times a minute and counts the rest,
so that no line is repeated without bound (`limit_logging` puts it on the loggers a client can
make speak).
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from llamaforge.serve.protocol import APIError

log = logging.getLogger(__name__)

RESERVED_FDS = 64  # the model's files, the engine, the loop, logging …
MAX_BACKLOG = 2048
# the loggers a client can make write: uvicorn's, asyncio's (accept errors) and ours; not
# uvicorn.access (--log-level info): one line per request, each worth keeping
CLIENT_LOGGERS = (
    "asyncio",
    "uvicorn",
    "uvicorn.error",
    "llamaforge.serve.app",
    "llamaforge.serve.engine",
    "llamaforge.serve.net",
)


@dataclass(frozen=True)
class Limits:
    """How long a client may take and how many connections all clients may hold."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive: float = 30.0  # > the clients' own (httpx, openai: 5 s): no reuse races
    max_connections: int = 512
    max_header_bytes: int = 16 * 1024

    def check(self) -> None:
        """Raise ValueError naming the first limit out of range."""
        for name in ("header_timeout", "body_timeout", "keep_alive"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} {value}: must be > 0 seconds")
        if self.max_connections < 1:
            raise ValueError(f"max_connections {self.max_connections}: must be >= 1")


def lingering(max_connections: int) -> int:
    """How many refused connections may linger (see `LimitedH11._refuse`)."""
    return max_connections // 8 + 8


def plan_connections(max_connections: int | None) -> tuple[int, int]:
    """``(max_connections, backlog)`` that fit under the open-file limit, raised first to its
    hard limit. asyncio accepts up to ``backlog`` connections in one go before any is
    refused, so the limit must hold the reserved descriptors, the cap, the refused
    connections that linger and twice the backlog; ``None`` picks the cap (at most 1024).
    Raises ValueError when ``max_connections`` cannot fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        want = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):  # a container may refuse: keep the soft limit
            pass
    room = soft - RESERVED_FDS
    if max_connections is None:
        max_connections = max(1, min(1024, room // 2))
    backlog = min(MAX_BACKLOG, (room - max_connections - lingering(max_connections)) // 2)
    if backlog < 8:
        raise ValueError(
            f"--max-connections {max_connections}: the open-file limit (ulimit -n) is {soft}; "
            f"with {RESERVED_FDS} kept for the server, at most {max(room - 16, 0)} connections fit"
        )
    return max_connections, backlog


def _raw_response(status: int, message: str, code: str, retry_after: bool = False) -> bytes:
    """A whole HTTP/1.1 response with OpenAI's error body that closes the connection."""
    body = json.dumps(APIError(status, message, code=code).body()).encode()
    head = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if retry_after:
        head.append("retry-after: 1")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class LimitedH11(H11Protocol):
    """uvicorn's h11 protocol with header and body timeouts and a connection cap (see the
    module's docstring); `protocol` makes one for a `Limits`."""

    limits: ClassVar[Limits] = Limits()
    refusing: ClassVar[set[LimitedH11]] = set()  # refused connections not yet closed

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._phase: str | None = None  # "head" or "body": what the timer waits for
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse()
        else:
            self._watch()

    def _refuse(self) -> None:
        """Answer 503 before the request and close. Closing a socket with the client's
        request unread makes the kernel reset the connection, which can destroy the answer
        on its way, so a few refused connections linger a second, reading and dropping what
        comes; the others are closed at once."""
        cap = self.limits.max_connections
        log.warning("refused a connection: over --max-connections %d", cap)
        self.connections.discard(self)  # not one of those the cap counts
        self._refused = True
        msg = f"the server holds its maximum of {cap} connections; retry later"
        self.transport.write(_raw_response(503, msg, "too_many_connections", retry_after=True))
        if len(self.refusing) >= lingering(cap):
            self.transport.close()
            return
        self.refusing.add(self)
        self.transport.write_eof()
        self.loop.call_later(1.0, self.transport.close)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self.conn.their_state is h11.IDLE and self._head_too_long(data):
            self.send_400_response("")
            return
        super().data_received(data)
        self._watch()

    def _head_too_long(self, data: bytes) -> bool:
        """Whether the request head being read is over ``max_header_bytes`` (h11 checks only
        an incomplete head: one that arrives whole in one read passes it)."""
        buffered = self.conn.trailing_data[0] + data
        end = buffered.find(b"\r\n\r\n")
        return (end if end >= 0 else len(buffered)) > self.limits.max_header_bytes

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse (malformed, or headers over ``max_header_bytes``):
        OpenAI's error shape rather than uvicorn's text."""
        msg = (
            f"invalid HTTP request: malformed, or headers over {self.limits.max_header_bytes} bytes"
        )
        self.transport.write(_raw_response(400, msg, "invalid_http"))
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._arm(None)
        self.refusing.discard(self)
        super().connection_lost(exc)

    def _watch(self) -> None:
        """Time what the connection waits for now: the next request's head (unless
        uvicorn's keep-alive timer covers an idle connection), or the current one's body."""
        state = self.conn.their_state
        phase = None
        if self.transport.is_closing():
            phase = None
        elif state is h11.IDLE and self.timeout_keep_alive_task is None:
            phase = "head"
        elif state is h11.SEND_BODY:
            phase = "body"
        if phase != self._phase:
            self._arm(phase)

    def _arm(self, phase: str | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._phase = phase
        if phase is not None:
            seconds = self.limits.header_timeout if phase == "head" else self.limits.body_timeout
            self._timer = self.loop.call_later(seconds, self._expired, phase, seconds)

    def _expired(self, phase: str, seconds: float) -> None:
        self._timer, self._phase = None, None
        if self.transport.is_closing():
            return
        if phase == "head":
            if self.conn.trailing_data[0]:  # part of a request came: say why it ends
                msg = f"the request's headers did not arrive within {seconds:g} s"
                self.transport.write(_raw_response(408, msg, "header_timeout"))
        elif self.cycle is not None and not self.cycle.response_started:
            self.cycle.disconnected = True  # the handler waiting for the body gives up
            self.cycle.message_event.set()
            msg = f"the request's body did not arrive within {seconds:g} s"
            self.transport.write(_raw_response(408, msg, "body_timeout"))
        self.transport.close()


def protocol(limits: Limits) -> type[LimitedH11]:
    """A `LimitedH11` class with ``limits`` (uvicorn instantiates the class it is given)."""
    return type("LimitedH11", (LimitedH11,), {"limits": limits, "refusing": set()})


def uvicorn_config(app: Any, limits: Limits, backlog: int, log_level: str) -> uvicorn.Config:
    """uvicorn's settings for ``app`` under ``limits``; its loggers rate-limited."""
    config = uvicorn.Config(
        app,
        http=protocol(limits),
        log_level=log_level,
        timeout_keep_alive=limits.keep_alive,  # type: ignore[arg-type]  (a float works)
        timeout_graceful_shutdown=5,
        backlog=backlog,
        h11_max_incomplete_event_size=limits.max_header_bytes,
    )
    limit_logging()  # after Config: it configures uvicorn's loggers
    return config


class RateLimit(logging.Filter):
    """Lets each message (its logger and format string) through ``burst`` times per
    ``window`` seconds and drops the rest; the first one let through after a window with
    drops says how many were dropped."""

    MAX_KEYS = 1024  # distinct messages remembered (then forgotten all at once)

    def __init__(
        self, burst: int = 5, window: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.burst, self.window, self.clock = burst, window, clock
        self._seen: dict[tuple[str, str], list[float]] = {}  # [start, passed, dropped]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key, now = (record.name, str(record.msg)), self.clock()
        with self._lock:
            entry = self._seen.get(key)
            if entry is None or now - entry[0] >= self.window:
                if len(self._seen) >= self.MAX_KEYS:
                    self._seen.clear()
                dropped = int(entry[2]) if entry is not None else 0
                self._seen[key] = [now, 1, 0]
                if dropped:
                    record.msg = (
                        f"{record.msg} [and {dropped} more like it in {self.window:g} s, "
                        "not logged]"
                    )
                return True
            if entry[1] < self.burst:
                entry[1] += 1
                return True
            entry[2] += 1
            return False


_FILTER = RateLimit()


def limit_logging(names: tuple[str, ...] = CLIENT_LOGGERS) -> RateLimit:
    """Put the shared `RateLimit` on the loggers ``names`` (once each)."""
    for name in names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    return _FILTER
