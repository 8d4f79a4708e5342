"""A QMP connection usable from synchronous, multi-threaded code.

qemu.qmp's :class:`QMPClient` is asyncio-based. This wrapper runs it in a
private event-loop thread, so commands can be issued from any thread and
events reach subscribers while other threads block (e.g. ``blockdev-add`` of
an NBD node waits for the NBD handshake that our own server thread answers).

Errors: :class:`QmpCommandError` for a command QEMU refused (carries the
command, QEMU's ``error_class`` and description), :class:`QmpDisconnected`
when the connection is lost or cannot be made (both are SourceErrors).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, QMPError, Runstate

from ..errors import SourceError, SourceUnavailable, ignored

log = logging.getLogger(__name__)

T = TypeVar("T")
Event = dict[str, Any]


class QmpCommandError(SourceError):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QEMU refused {command}: {desc} ({error_class})")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QmpDisconnected(SourceUnavailable):
    """The QMP connection could not be made or was lost."""


def parse_address(address: str) -> str | tuple[str, int]:
    """``/path/to/sock`` or ``host:port``."""
    if "/" not in address and address.rpartition(":")[2].isdigit():
        host, _, port = address.rpartition(":")
        return host, int(port)
    return address


class QmpConnection:
    """One connected QMP session with its own event loop thread."""

    def __init__(self, address: str, timeout: float = 30.0) -> None:
        self.address = address
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vmrepo-qmp",
                                        daemon=True)
        self._thread.start()
        self._subscribers: list[Callable[[Event | None], None]] = []
        self._client: QMPClient | None = None
        self._watch: asyncio.Task[None] | None = None
        try:
            self._call(self._connect(), timeout + 5)
        except BaseException:
            self._stop_loop()
            raise

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except FutureTimeout:
            fut.cancel()
            raise SourceUnavailable(f"QMP at {self.address} did not answer within "
                                    f"{timeout:.0f} s") from None

    async def _connect(self) -> None:
        client = QMPClient("vmrepo")
        try:
            await asyncio.wait_for(client.connect(parse_address(self.address)), self.timeout)
        except TimeoutError:
            with ignored(log, "disconnecting after a timeout", Exception):
                await client.disconnect()
            raise QmpDisconnected(
                f"QMP at {self.address} did not greet within {self.timeout:.0f} s (QEMU serves "
                "one client per QMP socket: is another client connected?)") from None
        except ConnectError as exc:
            raise QmpDisconnected(f"cannot connect to QMP at {self.address}: "
                                  f"{exc.exc if hasattr(exc, 'exc') else exc}") from None
        except OSError as exc:
            raise QmpDisconnected(f"cannot connect to QMP at {self.address}: "
                                  f"{exc.strerror or exc}") from None
        self._client = client
        listener = EventListener()
        client.register_listener(listener)
        self._watch = asyncio.ensure_future(self._pump(client, listener))

    async def _pump(self, client: QMPClient, listener: EventListener) -> None:
        """Deliver events to subscribers; ``None`` once the connection is gone."""
        events = asyncio.ensure_future(self._events(listener))
        while client.runstate == Runstate.RUNNING:
            await client.runstate_changed()
        events.cancel()
        for cb in list(self._subscribers):
            with ignored(log, "an event subscriber", Exception):
                cb(None)

    async def _events(self, listener: EventListener) -> None:
        async for event in listener:
            for cb in list(self._subscribers):
                with ignored(log, "an event subscriber", Exception):
                    cb(dict(event))

    def subscribe(self, callback: Callable[[Event | None], None]) -> None:
        """Call ``callback(event)`` for each event, and ``callback(None)`` on disconnect.

        Callbacks run in the QMP thread and must not block or issue commands.
        """
        self._subscribers.append(callback)

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.runstate == Runstate.RUNNING

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                timeout: float | None = None) -> Any:
        """Run one command and return its result."""
        client = self._client
        if client is None or not self.connected:
            raise QmpDisconnected(f"QMP connection to {self.address} is closed (QEMU exited?)")

        async def run() -> Any:
            try:
                return await client.execute(command, arguments)
            except ExecuteError as exc:
                raise QmpCommandError(command, exc.error_class,
                                      str(exc.error.error.desc)) from None
            except QMPError as exc:
                raise QmpDisconnected(f"QMP connection to {self.address} lost during "
                                      f"{command}: {exc}") from None
            except (OSError, EOFError) as exc:
                raise QmpDisconnected(f"QMP connection to {self.address} lost during "
                                      f"{command}: {exc}") from None

        return self._call(run(), timeout or self.timeout)

    def hmp(self, command_line: str) -> str:
        """Run a human monitor command; return its output."""
        out = self.execute("human-monitor-command", {"command-line": command_line})
        return str(out)

    def close(self) -> None:
        client = self._client
        if client is not None:
            with ignored(log, "closing the QMP connection", Exception):
                self._call(client.disconnect(), 10)
        self._stop_loop()

    def _stop_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        with ignored(log, "closing the QMP event loop", Exception):
            self._loop.close()

    def __enter__(self) -> QmpConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
