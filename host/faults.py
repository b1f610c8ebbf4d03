"""A fault proxy for the serial link: drops, corrupts, duplicates and delays bytes and frames.

``FaultInjector`` applies a ``FaultConfig`` to one direction of a byte stream. It splits the
(clean) stream it is given into frames by their headers, so frame-level faults hit whole
frames: drop, duplicate, hold back (the stream keeps its order, as a serial line does), random
garbage before a frame (sometimes with SYNC bytes and a header that passes its CRC-8, the
worst case for a receiver), and a device reset before a host -> device frame (``on_reset``).
Byte-level faults then hit every byte: corrupt (flip bits), drop, duplicate. Everything is
drawn from a seeded ``random.Random``, so a failing run can be replayed. ``stats`` counts
``frames``, ``frames_corrupted`` (a copy arrived with a byte changed, lost or doubled),
``frames_dropped`` / ``_duplicated`` / ``_delayed``, ``bytes_corrupted`` / ``_dropped`` /
``_duplicated``, ``garbage_bytes`` and ``resets``.

Two ways to use it, both between two transports:

* ``FaultyLink(host_side, device_side, ...)``: in-process, e.g. between two ``pipe_pair`` ends;
* ``TcpFaultProxy(target_port, ...)``: listens on 127.0.0.1 and forwards each client to
  127.0.0.1:target_port (loopback addresses only, by construction); ``mmfree-fpga proxy``
  runs one.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from mmfree_fpga.protocol import HEADER_LEN, MAX_PAYLOAD, SYNC, TRAILER_LEN, crc8_header

from .transport import LinkClosed, LinkError, SocketTransport, require_loopback

__all__ = ["FaultConfig", "FaultInjector", "FaultyLink", "TcpFaultProxy", "noisy_generation"]


@dataclass
class FaultConfig:
    """Fault rates of one direction; probabilities per byte or per frame."""

    byte_corrupt: float = 0.0      # flip 1..8 random bits of a byte
    byte_drop: float = 0.0
    byte_duplicate: float = 0.0
    frame_drop: float = 0.0
    frame_duplicate: float = 0.0
    frame_delay: float = 0.0       # hold a frame (and what follows) back by up to max_delay_s
    max_delay_s: float = 0.05
    garbage: float = 0.0           # random bytes before a frame
    max_garbage: int = 24
    reset: float = 0.0             # reset the device before a frame (host -> device direction)
    reset_at: tuple[int, ...] = field(default_factory=tuple)   # ... or before these frame numbers

    @classmethod
    def noisy(cls, rate: float = 0.01, **kw) -> "FaultConfig":
        """``rate`` byte corruption and frame loss, plus a little of everything else."""
        base = dict(byte_corrupt=rate, frame_drop=rate, byte_drop=rate / 10, byte_duplicate=rate / 10,
                    frame_duplicate=rate, frame_delay=rate, garbage=rate)
        base.update(kw)
        return cls(**base)


class FaultInjector:
    """Applies a FaultConfig to the bytes of one direction; ``process`` -> [(delay_s, bytes)]."""

    def __init__(self, config: FaultConfig, seed: int = 0, on_reset=None):
        self.config = config
        self.rng = random.Random(seed)
        self.on_reset = on_reset
        self.stats: Counter = Counter()
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        return len(self._buf)

    def process(self, data: bytes) -> list[tuple[float, bytes]]:
        """Faulted output for ``data``; an incomplete trailing frame waits for its bytes."""
        self._buf += data
        out = []
        for unit, is_frame in self._split():
            out += self._frame_faults(unit) if is_frame else [(0.0, self._byte_faults(unit))]
        return [(d, b) for d, b in out if b]

    def flush(self) -> list[tuple[float, bytes]]:
        """Pass on a partial frame that never completed (the sender stopped mid-frame)."""
        data, self._buf = bytes(self._buf), bytearray()
        return [(0.0, self._byte_faults(data))] if data else []

    def _split(self):
        buf = self._buf
        i = 0
        while i < len(buf):
            if buf[i] != SYNC:
                j = buf.find(SYNC, i)
                j = len(buf) if j < 0 else j
                yield bytes(buf[i:j]), False
                i = j
                continue
            if len(buf) - i < HEADER_LEN:
                break
            length = buf[i + 3] | (buf[i + 4] << 8)
            if length > MAX_PAYLOAD or crc8_header(buf[i + 1:i + 5]) != buf[i + 5]:
                yield bytes(buf[i:i + 1]), False
                i += 1
                continue
            end = i + HEADER_LEN + length + TRAILER_LEN
            if end > len(buf):
                break
            yield bytes(buf[i:end]), True
            i = end
        del buf[:i]

    def _frame_faults(self, frame: bytes) -> list[tuple[float, bytes]]:
        c, rng, st = self.config, self.rng, self.stats
        st["frames"] += 1
        if self.on_reset is not None and (st["frames"] in c.reset_at or rng.random() < c.reset):
            st["resets"] += 1
            self.on_reset()
        out = []
        if rng.random() < c.garbage:
            out.append((0.0, self._garbage()))
        if rng.random() < c.frame_drop:
            st["frames_dropped"] += 1
            return out
        delay = 0.0
        if rng.random() < c.frame_delay:
            st["frames_delayed"] += 1
            delay = rng.uniform(0.0, c.max_delay_s)
        copies = [self._byte_faults(frame)]
        out.append((delay, copies[0]))
        if rng.random() < c.frame_duplicate:
            st["frames_duplicated"] += 1
            copies.append(self._byte_faults(frame))
            out.append((0.0, copies[1]))
        if any(copy != frame for copy in copies):
            st["frames_corrupted"] += 1      # a copy arrives with a byte changed, lost or doubled
        return out

    def _garbage(self) -> bytes:
        rng = self.rng
        junk = bytearray(rng.randbytes(rng.randint(1, self.config.max_garbage)))
        for _ in range(rng.randint(0, 2)):
            junk.insert(rng.randrange(len(junk) + 1), SYNC)
        if rng.random() < 0.1:
            # a false start whose header passes its CRC: the receiver must not be fooled for long
            length = rng.randrange(MAX_PAYLOAD + 1).to_bytes(2, "little")
            head = bytes((rng.randrange(256), rng.randrange(256), *length))
            junk += bytes((SYNC,)) + head + bytes((crc8_header(head),))
        self.stats["garbage_bytes"] += len(junk)
        return bytes(junk)

    def _byte_faults(self, data: bytes) -> bytes:
        c, rng, st = self.config, self.rng, self.stats
        if not (c.byte_corrupt or c.byte_drop or c.byte_duplicate):
            return data
        out = bytearray()
        for b in data:
            r = rng.random()
            if r < c.byte_drop:
                st["bytes_dropped"] += 1
                continue
            r -= c.byte_drop
            if r < c.byte_corrupt:
                st["bytes_corrupted"] += 1
                b ^= rng.randrange(1, 256)
            elif r - c.byte_corrupt < c.byte_duplicate:
                st["bytes_duplicated"] += 1
                out.append(b)
            out.append(b)
        return bytes(out)


class _Pump:
    """Moves bytes from ``src`` to ``dst`` through an injector, keeping their order."""

    STALE_S = 0.05

    def __init__(self, src, dst, injector: FaultInjector, name: str, stop: threading.Event):
        self.src, self.dst, self.injector, self.stop = src, dst, injector, stop
        self.queue: deque[tuple[float, bytes]] = deque()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._last_due = 0.0
        self._last_input = time.monotonic()

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                timeout = 0.005 if self.queue or self.injector.pending else 0.02
                data = self.src.read(timeout)
                now = time.monotonic()
                chunks = []
                if data:
                    self._last_input = now
                    chunks = self.injector.process(data)
                elif self.injector.pending and now - self._last_input > self.STALE_S:
                    chunks = self.injector.flush()
                for delay, chunk in chunks:
                    self._last_due = max(self._last_due, now + delay)
                    self.queue.append((self._last_due, chunk))
                while self.queue and self.queue[0][0] <= now:
                    self.dst.write(self.queue.popleft()[1])
        except LinkClosed:
            pass
        finally:
            self.stop.set()


class FaultyLink:
    """Connects two transports through fault injectors, one per direction, in two threads.

    ``host_side`` is the transport facing the driver, ``device_side`` the one facing the
    device; ``on_reset`` (e.g. ``DeviceModel.power_cycle``) is called for resets, which are
    drawn in the host -> device direction. ``close()`` stops the threads and closes both.
    """

    def __init__(self, host_side, device_side, to_device: FaultConfig, to_host: FaultConfig,
                 seed: int = 0, on_reset=None):
        self.stop_event = threading.Event()
        self.to_device = FaultInjector(to_device, seed * 2 + 1, on_reset)
        self.to_host = FaultInjector(to_host, seed * 2 + 2)
        self.host_side, self.device_side = host_side, device_side
        self._pumps = [_Pump(host_side, device_side, self.to_device, "faults-to-device", self.stop_event),
                       _Pump(device_side, host_side, self.to_host, "faults-to-host", self.stop_event)]
        for pump in self._pumps:
            pump.thread.start()

    @property
    def stats(self) -> Counter:
        return self.to_device.stats + self.to_host.stats

    def close(self) -> None:
        self.stop_event.set()
        for pump in self._pumps:
            pump.thread.join(timeout=5)
        self.host_side.close()
        self.device_side.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TcpFaultProxy:
    """A TCP proxy on 127.0.0.1 that forwards to 127.0.0.1:target_port through a FaultyLink.

    One client at a time (a new client ends the previous session); its url is
    ``socket://127.0.0.1:<port>``. When either end of a session hangs up, the proxy closes the
    other. Stats add up over clients. ``port`` 0 picks a free port.
    """

    def __init__(self, target_port: int, to_device: FaultConfig, to_host: FaultConfig, *,
                 port: int = 0, host: str = "127.0.0.1", target_host: str = "127.0.0.1",
                 seed: int = 0, on_reset=None):
        self.host = require_loopback(host)
        self.target = (require_loopback(target_host), target_port)
        self.to_device, self.to_host, self.seed, self.on_reset = to_device, to_host, seed, on_reset
        try:
            self._sock = socket.create_server((host, port))
        except OSError as e:
            raise LinkError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another port "
                            "(0 picks a free one)") from None
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._links: list[FaultyLink] = []
        self._lock = threading.Lock()
        self._clients = 0
        self.stats: Counter = Counter()
        self._thread = threading.Thread(target=self._serve, name="fault-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"socket://{self.host}:{self.port}"

    @property
    def clients(self) -> int:
        """Clients accepted so far."""
        return self._clients

    def _retire(self, links) -> None:
        for link in links:
            link.close()
            with self._lock:
                self._links.remove(link)
                self.stats += link.stats

    def _serve(self) -> None:
        import select
        try:
            while not self._stop.is_set():
                # a session whose client or device hung up ends on both sides at once (the device
                # server then knows its host is gone)
                self._retire([link for link in self._links if link.stop_event.is_set()])
                ready, _, _ = select.select([self._sock], [], [], 0.02)
                if not ready:
                    continue
                conn, _ = self._sock.accept()
                self._retire(list(self._links))      # one client at a time: the newest
                try:
                    upstream = socket.create_connection(self.target, timeout=5)
                except OSError:
                    conn.close()
                    continue
                self._clients += 1
                link = FaultyLink(SocketTransport(conn, "proxy-client"), SocketTransport(upstream, "proxy-upstream"),
                                  self.to_device, self.to_host, seed=self.seed * 1000 + self._clients,
                                  on_reset=self.on_reset)
                with self._lock:
                    self._links.append(link)
        finally:
            self._sock.close()

    def link_stats(self) -> Counter:
        with self._lock:
            return self.stats + sum((link.stats for link in self._links), Counter())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for link in self._links:
            link.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def noisy_generation(device, image, prompt: list[int], steps: int, *, rate: float, seed: int,
                     load_rate: float | None = None, force_load: bool = False, limit_s: float = 600.0) -> dict:
    """A host session with ``device`` (a serve backend) over a noisy line, as ``mmfree-fpga serve``
    and ``mmfree-fpga proxy`` would give it: ``device`` behind a ``TcpDeviceServer``, a
    ``TcpFaultProxy`` (``seed``) in front, the driver through it, with faults
    ``FaultConfig.noisy(rate)`` in both directions. The driver connects, loads ``image``
    (``force_load``: even if the device holds it; at ``load_rate`` if given) and generates
    ``steps`` greedy tokens after ``prompt``. A session that outlives ``limit_s`` is cut off
    (the proxy closes) and raises TimeoutError.

    Returns ``tokens`` (prompt + generated), ``faults`` (the proxy's stats), ``driver`` (the
    driver's stats), ``wall_s`` (the session, from connecting to the last token).
    """
    from .driver import Driver
    from .transport import TcpDeviceServer

    to_device, to_host = FaultConfig.noisy(rate), FaultConfig.noisy(rate)
    cut_off = threading.Event()

    def set_rate(value: float) -> None:
        for config in (to_device, to_host):      # the live injectors read these objects
            for name, v in vars(FaultConfig.noisy(value)).items():
                setattr(config, name, v)

    with TcpDeviceServer(device) as server, \
            TcpFaultProxy(server.port, to_device, to_host, seed=seed) as proxy:

        def watchdog():
            cut_off.set()
            proxy.close()

        timer = threading.Timer(limit_s, watchdog)
        timer.start()
        t0 = time.perf_counter()
        try:
            with Driver.open(proxy.url) as driver:
                driver.connect(image.cfg)
                set_rate(rate if load_rate is None else load_rate)
                driver.ensure_weights(image, force=force_load)
                set_rate(rate)
                tokens = list(prompt) + list(driver.generate(list(prompt), steps))
        except Exception as e:
            if cut_off.is_set():
                raise TimeoutError(f"the noisy session did not end within {limit_s:.0f} s") from e
            raise
        finally:
            timer.cancel()
        wall = time.perf_counter() - t0
        faults = proxy.link_stats()
    return {"tokens": tokens, "faults": dict(faults), "driver": driver.stats.as_dict(), "wall_s": wall}
