"""Who may talk to the server and for how long: the Host / Origin allow-list and the connection deadlines.

Host and Origin: a server without an API key (`serve --no-api-key`, loopback only) would otherwise answer any
page a browser has open. A page of another site can POST to http://127.0.0.1:PORT (cross-site request: the
browser sends `Origin` and `Sec-Fetch-Site: cross-site`) or make its own name resolve to 127.0.0.1 (DNS
rebinding: the browser sends that name as `Host`). So such a server answers only requests whose Host is an
allowed name (the loopback names by default) and that come from no other site.

Deadlines: uvicorn closes a keep-alive connection idle after a response, but a connection that never sends a
whole request line and headers (silent, or one byte now and then) was held forever (100 such connections
held for 60 s). `deadline_protocol` closes a connection whose request headers are not complete within
`header_timeout` seconds of its opening or of its previous response; the Guard (app.py) holds the body to
`body_timeout` seconds between two chunks.

Draining (SIGTERM): uvicorn closes the listening socket, then closes every idle connection at once. Two kinds
of request were lost that way, each a reset or a disconnect without an answer on the client's side: a
connection the kernel had completed but uvicorn not yet accepted (its request sent; closing the listener
resets it: 3 to 5 of 96 requests when a server under 16 clients was stopped), and a request sent on an idle
keep-alive connection just as the server closed it. `DrainingServer` accepts the connections waiting in the
listener's queue before it closes it, and `deadline_protocol`'s connections, told to shut down while idle,
stay open while the server still answers requests (checked every `DRAIN_GRACE_S`), so a request already on
its way is read; a request read during the drain is answered (with `Connection: close`) like any other.
Connections opened after the listener closed are refused.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any
from urllib.parse import urlsplit

import uvicorn

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
DRAIN_GRACE_S = 0.5  # in a drain, how often an idle connection checks whether it may close
BACKLOG_ROUNDS = 10  # accept passes over the listener's queue at shutdown (new connections may keep coming)


def split_host(value: str) -> str:
    """The host name of a Host header value or an Origin's netloc, lower-case, without port or brackets."""
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:8000
        return value[1:].split("]", 1)[0]
    if value.count(":") > 1:  # a bare IPv6 address
        return value
    return value.split(":", 1)[0]


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    return "*" in allowed or split_host(host) in {a.lower().strip("[]") for a in allowed}


def cross_site_problem(headers: dict[bytes, bytes], allowed: tuple[str, ...]) -> str | None:
    """Why a request must be refused as coming from another site or through a foreign name; None if fine."""
    host = headers.get(b"host", b"").decode("latin-1")
    if not host_allowed(host, allowed):
        return (f"Host {host[:100]!r} is not one this server answers to (allowed: {', '.join(allowed)}): call it "
                "by one of those names (a page of another site may not reach it through its own name)")
    site = headers.get(b"sec-fetch-site", b"").decode("latin-1").lower()
    if site in ("cross-site", "same-site"):
        return "a request sent by a page of another site is refused: call this server from a program or this host"
    origin = headers.get(b"origin", b"").decode("latin-1")
    if origin and (origin == "null" or not host_allowed(urlsplit(origin).netloc, allowed)):
        return f"Origin {origin[:100]!r} is not an allowed host ({', '.join(allowed)}): cross-site calls are refused"
    return None


def _uvicorn_http_protocol() -> type:
    """The protocol class uvicorn's `http="auto"` picks: httptools when installed, else h11."""
    try:
        import httptools  # noqa: F401

        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol


def deadline_protocol(header_timeout: float) -> type:
    """uvicorn's HTTP protocol that also closes a connection whose request headers are late (see above)."""
    base = _uvicorn_http_protocol()

    class HeaderDeadlineProtocol(base):  # type: ignore[misc, valid-type]
        _header_timer: asyncio.TimerHandle | None = None
        _draining = False

        def _arm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_late)

        def _headers_late(self) -> None:
            waiting = self.cycle is None or self.cycle.response_complete  # no request in progress
            if waiting and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def shutdown(self) -> None:
            """The drain: a connection with a request in progress closes after its response (uvicorn); an idle one
            stays open while the server still answers requests, for one more request that may be on its way
            (answered, then closed), and closes at the first check, every DRAIN_GRACE_S, that finds none."""
            self._draining = True
            if self.cycle is None or self.cycle.response_complete:
                self._drain_idle()
            else:
                super().shutdown()

        def _drain_idle(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(DRAIN_GRACE_S, self._drain_check)

        def _drain_check(self) -> None:
            if self.tasks:  # requests still answered somewhere: a client may yet send on this connection
                self._drain_idle()
            else:
                self._headers_late()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._draining and self.cycle is not None and not self.cycle.response_complete:
                self.cycle.keep_alive = False  # answered with Connection: close, then closed

    return HeaderDeadlineProtocol


class DrainingServer(uvicorn.Server):
    """uvicorn's server that, when it shuts down, first takes in the connections waiting in its listening sockets'
    queue (their requests are answered in the drain), instead of resetting them by closing the sockets."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        config = self.config

        def protocol() -> asyncio.Protocol:  # as uvicorn's startup makes one per connection
            return config.http_protocol_class(config=config, server_state=self.server_state,
                                              app_state=self.lifespan.state, _loop=loop)

        for _ in range(BACKLOG_ROUNDS):
            waiting = [conn for listener in sockets or [] for conn in _accept_waiting(listener)]
            if not waiting:
                break
            for conn in waiting:
                try:
                    await loop.connect_accepted_socket(protocol, conn)
                except OSError:  # the client went away meanwhile
                    conn.close()
        await super().shutdown(sockets)  # closes the listeners first: no await between the last accept and it


def _accept_waiting(listener: socket.socket) -> list[socket.socket]:
    """The connections the kernel holds completed in `listener`'s queue, accepted without blocking."""
    accepted = []
    try:
        listener.setblocking(False)
        while True:
            conn, _ = listener.accept()
            accepted.append(conn)
    except (BlockingIOError, InterruptedError):
        pass
    except OSError:  # the listener is closed already
        pass
    return accepted
