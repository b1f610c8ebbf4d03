"""Byte transports: the one interface the driver, the fault proxy and the served device share.

A transport moves bytes, nothing more: ``write(data)``, ``read(timeout) -> bytes`` (whatever
arrived, waiting up to ``timeout`` for the first byte; ``b""`` on timeout) and ``close()``.
A closed or broken link raises ``LinkClosed``. Implementations:

* ``SerialTransport``: any pyserial ``serial_for_url`` URL (``/dev/ttyUSB1``, a pty,
  ``socket://127.0.0.1:P``, ``loop://``);
* ``PipeEnd``: one end of an in-process pipe pair (``pipe_pair()``), for tests;
* ``SocketTransport`` / ``FdTransport``: a connected socket / a raw file descriptor (a pty master).

``DeviceRunner`` pumps a transport into a device backend in a thread; ``TcpDeviceServer``
exposes a backend on 127.0.0.1 the way ``mmfree-fpga serve`` does. Every socket here is bound
to or connected to a loopback address only.
"""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import threading
import time
from collections import deque
from typing import Protocol

from mmfree_fpga.errors import UserError

__all__ = ["Transport", "LinkClosed", "LinkError", "SerialTransport", "PipeEnd", "pipe_pair",
           "SocketTransport", "FdTransport", "DeviceRunner", "TcpDeviceServer", "require_loopback"]


class LinkError(UserError):
    """The link to the device cannot be opened or was lost."""


class LinkClosed(LinkError):
    """The other end closed the link."""


class Transport(Protocol):
    name: str
    bytes_per_s: float | None      # line rate where it limits timing (a UART), else None

    def write(self, data: bytes) -> None: ...

    def read(self, timeout: float) -> bytes: ...

    def close(self) -> None: ...


def require_loopback(host: str) -> str:
    """``host`` if it is a loopback address; this toolkit never listens or proxies elsewhere."""
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise UserError(f"{host!r} is not a loopback address; the simulated device and the fault proxy "
                        "only use 127.0.0.1")
    return host


def _check_socket_url(url: str) -> None:
    """LinkError for a malformed ``socket://HOST:PORT`` URL (pyserial 3.5's own message for one
    is a KeyError from a bad format string: "'debug|info|warning|error'")."""
    from urllib.parse import parse_qs, urlsplit
    if not url.lower().startswith("socket://"):
        return
    usage = "expected socket://HOST:PORT, e.g. socket://127.0.0.1:7777"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:   # a port that is not a number or out of range
        tail = urlsplit(url).netloc.rsplit(":", 1)[-1]
        what = "is out of range" if tail.lstrip("+-").isdigit() else "is not a number"
        raise LinkError(f"device URL {url!r}: port {tail} {what} (a TCP port is 1..65535); {usage}") from None
    if not parts.hostname:
        raise LinkError(f"device URL {url!r} names no host; {usage}")
    if port is None or port == 0:
        raise LinkError(f"device URL {url!r} names no port (1..65535); {usage}")
    if parts.path not in ("", "/"):
        raise LinkError(f"device URL {url!r} has a path {parts.path!r}; {usage}")
    for option, values in parse_qs(parts.query, keep_blank_values=True).items():
        if option != "logging" or values[-1] not in ("debug", "info", "warning", "error"):
            raise LinkError(f"device URL {url!r}: unknown option {option}={values[-1]!r} (the only one is "
                            f"logging=debug|info|warning|error); {usage}")


class SerialTransport:
    """A pyserial port opened with ``serial_for_url``: a board's UART, a pty, socket://, loop://."""

    _SLICE_S = 0.005   # polling slice for ports without a file descriptor (loop://)

    def __init__(self, port, url: str):
        self.port, self.name = port, url
        is_device = "://" not in url
        self.bytes_per_s = port.baudrate / 10.0 if is_device else None
        try:
            self._fd = port.fileno()
        except (AttributeError, NotImplementedError, OSError, ValueError):
            self._fd = None

    @classmethod
    def open(cls, url: str, baudrate: int = 115200) -> "SerialTransport":
        import serial
        _check_socket_url(url)
        try:
            port = serial.serial_for_url(url, baudrate=baudrate, timeout=0, write_timeout=10)
        except ValueError as e:
            raise LinkError(f"cannot open device {url!r}: {e}; use a serial port path "
                            "(/dev/ttyUSB1) or socket://127.0.0.1:PORT") from None
        except (serial.SerialException, OSError) as e:
            reason = str(e)
            if "refused" in reason.lower():
                raise LinkError(f"no device listening at {url} (connection refused); start one with "
                                "'mmfree-fpga serve --port PORT' or check the port") from None
            raise LinkError(f"cannot open device {url}: {reason}") from None
        return cls(port, url)

    def write(self, data: bytes) -> None:
        import serial
        try:
            self.port.write(data)
        except (serial.SerialException, OSError) as e:
            raise LinkClosed(f"lost the link to {self.name} while writing: {e}") from None

    def read(self, timeout: float) -> bytes:
        import serial
        deadline = time.monotonic() + max(timeout, 0.0)
        try:
            while True:
                if self._fd is not None:
                    ready, _, _ = select.select([self._fd], [], [], max(deadline - time.monotonic(), 0.0))
                    if ready:
                        data = self.port.read(65536)
                        if data:
                            return data
                else:
                    waiting = self.port.in_waiting
                    if waiting:
                        return self.port.read(waiting)
                if time.monotonic() >= deadline:
                    return b""
                if self._fd is None:
                    time.sleep(self._SLICE_S)
        except (serial.SerialException, OSError) as e:
            raise LinkClosed(f"lost the link to {self.name}: {e}") from None

    def close(self) -> None:
        # pyserial 3.5's socket:// close() skips socket.close() when shutdown() fails (a peer
        # that already hung up), leaking the socket; close it here as well (idempotent).
        sock = getattr(self.port, "_socket", None)
        try:
            self.port.close()
        finally:
            if sock is not None:
                sock.close()


class PipeEnd:
    """One end of an in-process byte pipe; ``pipe_pair()`` makes two connected ends."""

    bytes_per_s = None

    def __init__(self, name: str, cond: threading.Condition):
        self.name = name
        self._cond = cond
        self._buf = bytearray()
        self.peer: PipeEnd | None = None
        self.closed = False

    def write(self, data: bytes) -> None:
        with self._cond:
            if self.closed or self.peer is None or self.peer.closed:
                raise LinkClosed(f"pipe {self.name} is closed")
            self.peer._buf += data
            self._cond.notify_all()

    def read(self, timeout: float) -> bytes:
        with self._cond:
            self._cond.wait_for(lambda: self._buf or self.closed or self.peer.closed, max(timeout, 0.0))
            if self._buf:
                data = bytes(self._buf)
                self._buf.clear()
                return data
            if self.closed or self.peer.closed:
                raise LinkClosed(f"pipe {self.name} is closed")
            return b""

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


def pipe_pair(name: str = "pipe") -> tuple[PipeEnd, PipeEnd]:
    cond = threading.Condition()
    a, b = PipeEnd(f"{name}:a", cond), PipeEnd(f"{name}:b", cond)
    a.peer, b.peer = b, a
    return a, b


class SocketTransport:
    """A connected TCP socket as a transport (owns the socket)."""

    bytes_per_s = None

    def __init__(self, sock: socket.socket, name: str = "socket"):
        self.sock, self.name = sock, name

    def write(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise LinkClosed(f"{self.name}: {e}") from None

    def read(self, timeout: float) -> bytes:
        try:
            ready, _, _ = select.select([self.sock], [], [], max(timeout, 0.0))
            if not ready:
                return b""
            data = self.sock.recv(65536)
        except (OSError, ValueError) as e:
            raise LinkClosed(f"{self.name}: {e}") from None
        if not data:
            raise LinkClosed(f"{self.name}: closed by the other end")
        return data

    def close(self) -> None:
        self.sock.close()


class FdTransport:
    """A raw file descriptor (e.g. the master side of a pty) as a transport (owns the fd)."""

    bytes_per_s = None

    def __init__(self, fd: int, name: str = "fd"):
        self.fd, self.name = fd, name

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as e:
            raise LinkClosed(f"{self.name}: {e}") from None

    def read(self, timeout: float) -> bytes:
        try:
            ready, _, _ = select.select([self.fd], [], [], max(timeout, 0.0))
            return os.read(self.fd, 65536) if ready else b""
        except OSError as e:
            raise LinkClosed(f"{self.name}: {e}") from None

    def close(self) -> None:
        os.close(self.fd)


class DeviceRunner:
    """Runs a device backend on one end of a transport, in a thread, until ``stop()``."""

    def __init__(self, backend, transport, poll_s: float = 0.01):
        self.backend, self.transport, self.poll_s = backend, transport, poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="device-runner", daemon=True)

    def start(self) -> "DeviceRunner":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.transport.read(self.poll_s)
                now = time.monotonic()
                out = self.backend.receive(data, now) if data else self.backend.poll(now)
                if out:
                    self.transport.write(out)
            except LinkClosed:
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class TcpDeviceServer:
    """A device backend as a byte stream on 127.0.0.1:port, one client at a time, like a UART.

    The device keeps its state (weights, position) across connections, as a board keeps it
    when the host closes the port. When a client leaves, the backend first finishes what that
    client left it (``settle``: a partial frame times out, answers being computed go out) and
    those bytes are discarded, so the next client hears nothing it did not ask for. A second
    client while one is connected is closed at once (unless the first has hung up already).

    ``baud``: pace both directions as a UART of that rate, 8N1, would carry them (10 bit times a
    byte): bytes reach the backend, and its answers the client, only once the line has had time
    to carry them, one direction independent of the other. Bytes a client sent before it left
    still reach the backend, as bytes on a wire do. None: as fast as the socket goes.
    """

    def __init__(self, backend, port: int = 0, host: str = "127.0.0.1", poll_s: float = 0.01,
                 baud: int | None = None):
        if baud is not None and baud <= 0:
            raise ValueError(f"baud must be positive, got {baud}")
        self.backend, self.poll_s = backend, poll_s
        self.byte_s = 10.0 / baud if baud else 0.0
        require_loopback(host)
        try:
            self._sock = socket.create_server((host, port))
        except OSError as e:
            raise LinkError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port "
                            "(0 picks a free one)") from None
        self.host, self.port = host, self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.connections = 0
        self.refused = 0
        self.discarded = 0          # bytes the device sent after their client had left

    @property
    def url(self) -> str:
        return f"socket://{self.host}:{self.port}"

    @staticmethod
    def _hung_up(conn: socket.socket) -> bool:
        """The peer closed (or reset) ``conn``; unread bytes do not count as closing."""
        try:
            return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _hang_up(self, conn: socket.socket) -> None:
        conn.close()
        now = time.monotonic()
        while self._inbox:               # (bytes already on the line arrive)
            _, data = self._inbox.popleft()
            self.discarded += len(self.backend.receive(data, now))
        self.discarded += sum(len(data) for _, data in self._outbox)
        self._outbox.clear()
        self._in_free = self._out_free = 0.0
        settle = getattr(self.backend, "settle", None)
        if settle is not None:
            self.discarded += settle()

    def _on_line(self, queue: deque, data: bytes, now: float, free: float) -> float:
        """Queue ``data`` behind what the line carries already; returns when the line is free."""
        due = max(now, free) + len(data) * self.byte_s
        queue.append((due, data))
        return due

    def serve_forever(self) -> None:
        client = None
        fileno = getattr(self.backend, "fileno", None)
        self._inbox: deque = deque()     # (due, bytes) from the client, on the paced line
        self._outbox: deque = deque()    # (due, bytes) for the client
        self._in_free = self._out_free = 0.0
        try:
            while not self._stop.is_set():
                fd = fileno() if fileno is not None else None
                watch = [self._sock] + ([client] if client is not None else []) + ([fd] if fd is not None else [])
                wait = self.poll_s
                for queue in (self._inbox, self._outbox):
                    if queue:
                        wait = max(0.0, min(wait, queue[0][0] - time.monotonic()))
                try:
                    ready, _, _ = select.select(watch, [], [], wait)
                except (OSError, ValueError):    # the backend restarted (power_cycle) under the select
                    continue
                now = time.monotonic()
                out = b""
                heard = client is not None and client in ready
                if heard:
                    try:
                        data = client.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        self._hang_up(client)
                        client = None
                        continue
                    if self.byte_s:
                        self._in_free = self._on_line(self._inbox, data, now, self._in_free)
                    else:
                        out = self.backend.receive(data, now)
                while self._inbox and self._inbox[0][0] <= now:
                    out += self.backend.receive(self._inbox.popleft()[1], now)
                if not heard:
                    out += self.backend.poll(now)
                if self.byte_s and out and client is not None:
                    self._out_free = self._on_line(self._outbox, out, now, self._out_free)
                    out = b""
                while self._outbox and self._outbox[0][0] <= now:
                    out += self._outbox.popleft()[1]
                if out and client is not None:
                    try:
                        client.sendall(out)
                    except OSError:
                        self._hang_up(client)
                        client = None
                elif out:
                    self.discarded += len(out)
                if self._sock in ready:
                    conn, _ = self._sock.accept()
                    if client is not None and self._hung_up(client):
                        self._hang_up(client)
                        client = None
                    if client is None:
                        client = conn
                        self.connections += 1
                    else:
                        conn.close()
                        self.refused += 1
        finally:
            if client is not None:
                client.close()
            self._sock.close()

    def start(self) -> "TcpDeviceServer":
        """Serve from a background thread (tests); ``stop()`` ends it."""
        self._thread = threading.Thread(target=self.serve_forever, name="device-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        else:
            self._sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
