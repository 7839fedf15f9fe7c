"""A TCP proxy the test controls, in front of a real server: pass-through, outages, drops, slow links.

    with FaultProxy(("127.0.0.1", server_port)) as proxy:    # listens on 127.0.0.1:proxy.port
        proxy.outage(5)                  # reset every open connection; refuse new ones for 5 s
        proxy.outage(5, after_bytes=8 << 20)   # the same, once 8 MiB more have passed (either way)
        proxy.slow(20e6)                 # each direction at most 20 MB/s per connection (None: full speed)
        proxy.http_errors(3, 503, "SlowDown")  # answer the next 3 requests with an S3 error, no server
        proxy.stall()                    # forward nothing until proxy.resume(): a black hole
        proxy.downstream_bytes, proxy.upstream_bytes, proxy.connections

Refusal is real: during an outage the listening socket is closed, so a connect gets ECONNREFUSED, and
open connections are closed with RST (SO_LINGER 0), as a crashed server or a broken network path does.
Everything runs in daemon threads of the test process, bound to 127.0.0.1.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time

CHUNK = 1 << 16


def _reset(sock: socket.socket) -> None:
    """Abort ``sock``: RST to the peer once its last user lets go. ``shutdown(SHUT_RD)`` wakes a thread
    blocked in ``recv`` on it (a plain ``close`` from another thread would not), and SO_LINGER 0 makes the
    final close send RST instead of FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass


class FaultProxy:
    def __init__(self, target: tuple[str, int], port: int = 0) -> None:
        self.target = target
        self._lock = threading.Lock()
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._refuse_until = 0.0
        self._cut_at: int | None = None  # downstream byte count at which to cut
        self._cut_for = 0.0
        self._rate: float | None = None
        self._stalled = threading.Event()
        self._errors: list[tuple[int, str]] = []
        self._closed = False
        self.downstream_bytes = 0
        self.upstream_bytes = 0
        self.connections = 0
        self.downstream_at_cut: int | None = None  # downstream_bytes when the last outage began
        self._listener = self._listen(port)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name="fault-proxy")
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- controls -------------------------------------------------------------------------------------
    def outage(self, seconds: float, after_bytes: int | None = None) -> None:
        """Reset every connection and refuse new ones for ``seconds`` -- now, or once ``after_bytes`` more
        bytes have been forwarded (to the clients or to the server: mid-download or mid-upload)."""
        with self._lock:
            if after_bytes is None:
                self._start_outage(seconds)
            else:
                self._cut_at = self.downstream_bytes + self.upstream_bytes + after_bytes
                self._cut_for = seconds

    def slow(self, bytes_per_s: float | None) -> None:
        with self._lock:
            self._rate = bytes_per_s

    def cancel_faults(self) -> None:
        """Forget armed cuts and pending HTTP errors; resume a stall (a running outage runs out)."""
        with self._lock:
            self._cut_at = None
            self._errors.clear()
            self._rate = None
        self._stalled.clear()

    def stall(self) -> None:
        self._stalled.set()

    def resume(self) -> None:
        self._stalled.clear()

    def http_errors(self, count: int, status: int = 503, code: str = "SlowDown") -> None:
        """The next ``count`` connections get one HTTP error response each (S3's XML body), then close."""
        with self._lock:
            self._errors.extend([(status, code)] * count)

    @property
    def in_outage(self) -> bool:
        return time.monotonic() < self._refuse_until

    def wait_healthy(self, timeout: float = 60) -> None:
        """Return once no outage is running or armed and the listener is back."""
        deadline = time.monotonic() + timeout
        while self.in_outage or self._cut_at is not None or self._listener.fileno() < 0:
            if time.monotonic() > deadline:
                raise TimeoutError("the proxy's outage did not end")
            time.sleep(0.02)

    def close(self) -> None:
        self._closed = True
        self._stalled.clear()
        with self._lock:
            pairs = list(self._pairs)
            self._pairs.clear()
        for a, b in pairs:
            _reset(a)
            _reset(b)
        try:
            self._listener.close()
        except OSError:
            pass
        self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- internals ------------------------------------------------------------------------------------
    def _listen(self, port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(128)
        return s

    def _start_outage(self, seconds: float) -> None:  # holds self._lock
        self._refuse_until = time.monotonic() + seconds
        self.downstream_at_cut = self.downstream_bytes
        self._cut_at = None
        for a, b in self._pairs:
            _reset(a)
            _reset(b)
        self._pairs.clear()
        try:
            self._listener.close()  # connects now fail with ECONNREFUSED
        except OSError:
            pass

    def _accept_loop(self) -> None:
        while not self._closed:
            if self.in_outage:
                time.sleep(0.02)
                continue
            if self._listener.fileno() < 0:  # the outage is over: listen again on the same port
                try:
                    self._listener = self._listen(self.port)
                except OSError:
                    time.sleep(0.02)
                    continue
            try:
                ready, _, _ = select.select([self._listener], [], [], 0.05)
            except (OSError, ValueError):
                continue
            if not ready:
                continue
            try:
                client, _ = self._listener.accept()
            except OSError:
                continue
            with self._lock:
                error = self._errors.pop(0) if self._errors else None
            if error is not None:
                threading.Thread(target=self._answer_error, args=(client, *error), daemon=True).start()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                client.close()
                continue
            with self._lock:
                self._pairs.add((client, upstream))
                self.connections += 1
            for src, dst, down in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(
                    target=self._pump, args=(src, dst, down, (client, upstream)), daemon=True
                ).start()

    def _answer_error(self, client: socket.socket, status: int, code: str) -> None:
        client.settimeout(5)
        head = b""
        try:
            while b"\r\n\r\n" not in head and len(head) < 1 << 16:
                got = client.recv(CHUNK)
                if not got:
                    break
                head += got
            body = (
                f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                f"<Message>injected by the test proxy</Message></Error>"
            ).encode()
            client.sendall(
                f"HTTP/1.1 {status} {code}\r\nContent-Type: application/xml\r\n"
                f"Content-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            client.shutdown(socket.SHUT_WR)  # a clean end: the client reads the whole answer
            deadline = time.monotonic() + 1
            while time.monotonic() < deadline and client.recv(CHUNK):  # drain a request body we ignore
                pass
        except OSError:
            pass
        finally:
            client.close()

    def _pump(self, src: socket.socket, dst: socket.socket, down: bool, pair) -> None:
        try:
            while not self._closed:
                while self._stalled.is_set() and not self._closed:
                    time.sleep(0.01)
                data = src.recv(CHUNK)
                if not data:
                    break
                rate = self._rate
                if rate:
                    time.sleep(len(data) / rate)
                with self._lock:
                    if down:
                        self.downstream_bytes += len(data)
                    else:
                        self.upstream_bytes += len(data)
                    total = self.downstream_bytes + self.upstream_bytes
                    if self._cut_at is not None and total >= self._cut_at:
                        self._start_outage(self._cut_for)
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                clean = pair in self._pairs  # not cut by an outage: pass the close on as a FIN
                self._pairs.discard(pair)
            for s in pair:
                try:
                    if clean:
                        s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass
