"""A small asyncio TCP proxy for fault injection between the gateway and an upstream (loopback only).

It forwards ``127.0.0.1:<port>`` to a target and can be told, at any moment, to:

* ``cut()``      abort every live connection (both sides get a reset: a killed upstream mid-stream);
* ``refuse()``   stop listening *and* cut: new connections are refused (the upstream is down);
* ``accept()``   listen again on the same port (the upstream is back);
* ``delay_s``    wait this long before forwarding each chunk, either way (a slow network).

Runs its own event loop in a thread (``TcpProxy(...).start()``), or as a process::

    python -m bench.tcp_proxy --target 127.0.0.1:9100 --port 9200 --delay-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import socket
import threading
from typing import Any

LOOPBACK = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _require_loopback(host: str) -> None:
    if not ipaddress.ip_address(socket.gethostbyname(host)).is_loopback:
        raise ValueError(f"{host}: the fault proxy only works on loopback addresses")


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = LOOPBACK, port: int | None = None,
                 delay_s: float = 0.0) -> None:
        _require_loopback(target_host)
        self.target = (target_host, target_port)
        self.port = port or _free_port()
        self.delay_s = delay_s
        self.connections = 0  # accepted so far
        self.bytes_up = 0  # client -> target
        self.bytes_down = 0  # target -> client
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.base_events.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def live(self) -> int:
        return len(self._links)

    # -- thread-side API ------------------------------------------------------------------
    def start(self) -> TcpProxy:
        self._thread = threading.Thread(target=self._run, name=f"tcp-proxy-{self.port}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the proxy did not start")
        self._call(self._listen())
        return self

    def cut(self) -> int:
        """Abort every live connection; returns how many there were."""
        return self._call(self._cut())

    def refuse(self) -> int:
        """Stop listening and cut what is live: the upstream looks dead."""
        return self._call(self._refuse())

    def accept(self) -> None:
        """Listen again (same port): the upstream is back."""
        self._call(self._listen())

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        with contextlib.suppress(RuntimeError):
            self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop = None

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, coro: Any, timeout_s: float = 10.0) -> Any:
        assert self._loop is not None, "start() the proxy first"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    # -- loop-side ------------------------------------------------------------------------
    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._handle, LOOPBACK, self.port, reuse_address=True)

    async def _cut(self) -> int:
        links = list(self._links)
        for client, upstream in links:
            for writer in (client, upstream):
                writer.transport.abort()
        self._links.clear()
        await asyncio.sleep(0)  # let the pumps see their closed transports
        return len(links)

    async def _refuse(self) -> int:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        cut = await self._cut()
        if server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 2.0)
        return cut

    async def _shutdown(self) -> None:
        await self._refuse()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.transport.abort()
            return
        link = (client_writer, up_writer)
        self._links.add(link)
        pumps = [asyncio.ensure_future(self._pump(client_reader, up_writer, "up")),
                 asyncio.ensure_future(self._pump(up_reader, client_writer, "down"))]
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            # One side closed: give the other a moment to flush what it already has.
            await asyncio.wait(pumps, timeout=1.0)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._tasks.difference_update(pumps)
            self._links.discard(link)
            for writer in link:
                writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        try:
            while data := await reader.read(65536):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                if direction == "up":
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            writer.transport.abort()


def main() -> None:
    parser = argparse.ArgumentParser(description="Loopback TCP proxy for fault injection.")
    parser.add_argument("--target", required=True, help="host:port to forward to (loopback).")
    parser.add_argument("--port", type=int, required=True, help="Port to listen on (127.0.0.1).")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="Delay before forwarding each chunk.")
    args = parser.parse_args()
    host, _, port = args.target.rpartition(":")
    proxy = TcpProxy(int(port), host or LOOPBACK, port=args.port, delay_s=args.delay_ms / 1000).start()
    print(f"proxy {proxy.url} -> {args.target}; Ctrl-C to stop", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        proxy.stop()


if __name__ == "__main__":
    main()
