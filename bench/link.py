"""A trace-driven link emulator: a user-space TCP proxy that replays mahimahi traces.

    coach bench link --up TRACE --down TRACE --listen HOST:PORT --upstream HOST:PORT
                     [--delay-ms D] [--queue-bytes Q]
    coach bench link --fidelity SECONDS [--up TRACE ...]      # measure it, write JSON

Clients connect to --listen; each connection is forwarded to --upstream. Bytes from the client
to the upstream cross the `up` link, the reverse the `down` link. Each link is shared by all
connections (one FIFO, as on a real bottleneck) and works like mahimahi's `mm-link`: at every
opportunity of the trace up to 1500 queued bytes leave (a partly filled packet still uses the
opportunity; capacity unused while the queue is empty is lost), then wait the fixed one-way delay.
No root is needed: TCP is terminated on both sides and only payload bytes are shaped, so
anything over TCP (gRPC/HTTP/2 included) passes through unchanged.

TCP cannot drop, so the queue is bounded by backpressure: when `queue_bytes` are waiting, the
proxy stops reading from the sending sockets (their kernel buffers fill and the sender blocks) and
reads again when the queue has drained to half. The proxy's sockets get small kernel buffers so
that the bytes standing before the bottleneck stay close to `queue_bytes`; the sender's own
socket send buffer comes on top (Linux autotunes it, on loopback up to tcp_wmem[2] = 4 MB),
like the unbounded default queue of mahimahi; a sender that wants less sets SO_SNDBUF.

Timing: one asyncio loop (in a background thread for the Python API) and a monotonic clock. A link
does not sleep per packet: it sleeps until the trace's next opportunity, and when it wakes (on
time or late) it releases the bytes of every opportunity that passed since it last looked, counted
from the trace itself. Late wake-ups therefore shift bytes by the lateness but lose no capacity,
and goodput follows the trace even on a busy machine.

Python API:
    with LinkEmulator("127.0.0.1:0", "127.0.0.1:50051", "const:8", "const:8") as emu:
        host, port = emu.address; ...; emu.stats()
    measure_goodput("ATT-LTE-driving-2016.up", seconds=4)   # push through it, time the receiver
    fidelity("const:8", seconds=20)                          # the dict `coach bench pipeline` uses
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import json
import logging
import os
import socket
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.mahimahi import PACKET_BYTES, Trace, capacity_mbps, load_trace, trace_stats
from coach_runtime.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_QUEUE_BYTES = 64 * 1024  # bytes waiting before the bottleneck (per link)
SOCKET_BUFFER_BYTES = 32 * 1024  # SO_RCVBUF/SO_SNDBUF of the proxy's own sockets
RESULTS = Path(__file__).resolve().parent / "results"


def parse_hostport(text: str) -> tuple[str, int]:
    """'HOST:PORT', '[v6]:PORT' or ':PORT' (localhost) -> (host, port)."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise UserError(f"'{text}': expected HOST:PORT, e.g. 127.0.0.1:50052")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


# ---------------------------------------------------------------- one direction of the link


class _Link:
    """One shaped direction: a FIFO of (destination, bytes) released at trace opportunities."""

    def __init__(self, loop, name: str, trace: Trace, delay_ms: float, queue_bytes: int, t0: float):
        self.loop, self.name, self.trace = loop, name, trace
        self.delay_s = delay_ms / 1e3
        self.high, self.low = queue_bytes, queue_bytes // 2  # pause / resume reading
        self.t0 = t0  # loop time of trace time 0
        self._ts = trace.timestamps_ms.tolist()  # bisect on a list: fast for scalars
        self._n, self._period = trace.packets, trace.period_ms
        self.queue: collections.deque = collections.deque()  # [dest, bytes | None (EOF)]
        self.queued = 0
        self.last_ms = 0.0  # opportunities at trace times <= last_ms are used or lost
        self.timer: asyncio.TimerHandle | None = None
        self.paused_sources: set[_Side] = set()
        self.delay_line: collections.deque = collections.deque()  # (due loop time, dest, data)
        self.delay_timer: asyncio.TimerHandle | None = None
        self.last_due = 0.0  # delay-line times never go back (FIFO)
        self.delivered = 0  # bytes that left the link (payload)

    # trace arithmetic (scalar, hot path)
    def _count(self, t_ms: float) -> int:
        cycles, rest = divmod(t_ms, self._period)
        return int(cycles) * self._n + bisect.bisect_right(self._ts, rest)

    def _time_of(self, index: int) -> float:
        cycles, i = divmod(index, self._n)
        return cycles * self._period + self._ts[i]

    def _now_ms(self) -> float:
        return (self.loop.time() - self.t0) * 1e3

    # input side
    def push(self, source: _Side, data: bytes | None) -> None:
        """Queue bytes read from `source` (None: its EOF) for its peer."""
        if not self.queue:  # idle link: capacity before now is lost
            self.last_ms = max(self.last_ms, self._now_ms())
        self.queue.append([source.peer, data])
        if data:
            self.queued += len(data)
            if self.queued >= self.high and source.transport is not None:
                source.transport.pause_reading()
                self.paused_sources.add(source)
        self.kick()

    def kick(self) -> None:
        """Make sure a wake-up is scheduled while there is something to send."""
        if self.timer is not None or not self.queue:
            return
        head = self.queue[0][0]
        if not head.writable and not head.closed:
            return  # head-of-line blocked on a slow receiver; resume_writing kicks us
        if self.queue[0][1] is None:  # an EOF needs no opportunity
            self.timer = self.loop.call_soon(self._tick)
            return
        t_next = self._time_of(self._count(self.last_ms))
        self.timer = self.loop.call_at(self.t0 + t_next / 1e3, self._tick)

    def unblock(self) -> None:
        """The head's receiver can take bytes again: capacity while it could not is lost."""
        self.last_ms = max(self.last_ms, self._now_ms())
        self.kick()

    def _tick(self) -> None:
        self.timer = None
        now_ms = self._now_ms()
        passed = self._count(now_ms)
        budget = (passed - self._count(self.last_ms)) * PACKET_BYTES
        self.last_ms = max(self.last_ms, now_ms)
        # bytes left the link at the last opportunity that passed, even if we woke up late
        exit_time = self.t0 + self._time_of(passed - 1) / 1e3 if budget else self.loop.time()
        out: list = []  # runs of [dest, [chunks]]
        while self.queue:
            entry = self.queue[0]
            dest, data = entry
            if dest.closed:  # receiver gone: drop what was meant for it
                self.queue.popleft()
                if data:
                    self.queued -= len(data)
                continue
            if not dest.writable:
                break
            if data is None:
                self.queue.popleft()
                out.append([dest, None])
                continue
            if budget <= 0:
                break
            if len(data) <= budget:
                self.queue.popleft()
                piece = data
            else:
                piece, entry[1] = data[:budget], data[budget:]
            budget -= len(piece)
            self.queued -= len(piece)
            self.delivered += len(piece)
            if out and out[-1][0] is dest and out[-1][1] is not None:
                out[-1][1].append(piece)
            else:
                out.append([dest, [piece]])
        if self.paused_sources and self.queued <= self.low:
            for src in self.paused_sources:
                if not src.closed:
                    src.transport.resume_reading()
            self.paused_sources.clear()
        for dest, chunks in out:
            data = None if chunks is None else b"".join(chunks)
            if self.delay_s <= 0:
                dest.deliver(data)
            else:
                self.last_due = max(self.last_due, exit_time + self.delay_s)
                self.delay_line.append((self.last_due, dest, data))
        if self.delay_line and self.delay_timer is None:
            self.delay_timer = self.loop.call_at(self.delay_line[0][0], self._release_delayed)
        self.kick()

    def _release_delayed(self) -> None:
        self.delay_timer = None
        now = self.loop.time()
        while self.delay_line and self.delay_line[0][0] <= now + 1e-4:
            _, dest, data = self.delay_line.popleft()
            dest.deliver(data)
        if self.delay_line:
            self.delay_timer = self.loop.call_at(self.delay_line[0][0], self._release_delayed)

    def close(self) -> None:
        for h in (self.timer, self.delay_timer):
            if h is not None:
                h.cancel()
        self.queue.clear()
        self.delay_line.clear()


# ---------------------------------------------------------------- one socket of a proxied pair


class _Side(asyncio.Protocol):
    """One socket of a proxied connection; what it reads goes into `link_out`, towards `peer`."""

    def __init__(self, emu: LinkEmulator, link_out: _Link, link_in: _Link, peer: _Side | None):
        self.emu, self.link_out, self.link_in = emu, link_out, link_in
        self.is_client = peer is None  # accepted from a client (vs dialled for that client)
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = peer
        self.writable = True
        self.closed = False
        self.eof_in = False  # this socket sent us EOF
        self.eof_out = False  # we sent EOF to this socket

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.emu._sides.add(self)
        if self.is_client:  # nothing to forward to until the upstream answers
            transport.pause_reading()
            asyncio.ensure_future(self.emu._dial(self))
        else:  # paired before any byte can arrive (an HTTP/2 server speaks first)
            self.peer.peer = self

    def data_received(self, data: bytes) -> None:
        self.link_out.push(self, memoryview(data))  # sliced without copies on the way

    def eof_received(self) -> bool:
        self._eof()
        return True  # keep our write side open: half-close, as TCP allows

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.emu._sides.discard(self)
        self.link_out.paused_sources.discard(self)
        self._eof()
        self._close_if_done()

    def _done(self) -> bool:
        return self.closed or self.eof_out

    def _close_if_done(self) -> None:
        """Close both sockets once each has received our EOF (or is gone)."""
        peer = self.peer
        if peer is not None and self._done() and peer._done():
            for side in (self, peer):
                if not side.closed and side.transport is not None:
                    side.transport.close()

    def pause_writing(self) -> None:
        self.writable = False

    def resume_writing(self) -> None:
        self.writable = True
        self.link_in.unblock()

    def _eof(self) -> None:
        if not self.eof_in:
            self.eof_in = True
            if self.peer is not None:
                self.link_out.push(self, None)
            elif self.transport is not None:
                self.transport.close()

    def deliver(self, data: bytes | None) -> None:
        """Bytes (or EOF) that crossed the link towards this socket."""
        if self.closed:
            return
        if data is not None:
            self.transport.write(data)
            return
        self.eof_out = True
        if self.peer is not None and self.peer._done():  # both directions finished
            self._close_if_done()
        elif self.transport.can_write_eof():
            self.transport.write_eof()
        else:
            self.transport.close()


# ---------------------------------------------------------------- the emulator


def _small_buffers(sock: socket.socket, size: int) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


class LinkEmulator:
    """The proxy, run by an asyncio loop in a background thread: start(), stop(), stats()."""

    def __init__(
        self,
        listen: str | tuple[str, int],
        upstream: str | tuple[str, int],
        up_trace: str | Trace,
        down_trace: str | Trace,
        delay_ms: float = 0.0,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        socket_buffer_bytes: int = SOCKET_BUFFER_BYTES,
    ):
        self.listen = parse_hostport(listen) if isinstance(listen, str) else tuple(listen)
        self.upstream = parse_hostport(upstream) if isinstance(upstream, str) else tuple(upstream)
        self.up_trace, self.down_trace = load_trace(up_trace), load_trace(down_trace)
        if delay_ms < 0:
            raise UserError(f"--delay-ms {delay_ms}: a delay cannot be negative")
        if queue_bytes < PACKET_BYTES:
            raise UserError(f"--queue-bytes {queue_bytes}: give at least {PACKET_BYTES} bytes")
        self.delay_ms, self.queue_bytes = float(delay_ms), int(queue_bytes)
        self.socket_buffer_bytes = int(socket_buffer_bytes)
        self.address: tuple[str, int] | None = None  # where it listens, once started
        self.t0: float | None = None  # time.monotonic() of trace time 0
        self._sides: set[_Side] = set()
        self._links: dict[str, _Link] = {}
        self._connections = 0
        self._failed_connects = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server = None

    # lifecycle
    def start(self) -> LinkEmulator:
        if self._thread is not None:
            raise RuntimeError("LinkEmulator already started")
        ready = threading.Event()
        error: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._open())
            except BaseException as exc:  # bind failure etc.: hand it to start()
                error.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=main, name="link-emulator", daemon=True)
        self._thread.start()
        ready.wait()
        if error:
            self._thread.join()
            exc = error[0]
            if isinstance(exc, OSError):
                raise UserError(
                    f"link emulator cannot listen on {self.listen[0]}:{self.listen[1]} "
                    f"({exc.strerror or exc}); pick a free port"
                ) from None
            raise exc
        return self

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        done = threading.Event()

        def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for side in list(self._sides):
                if side.transport is not None:
                    side.transport.abort()
            for link in self._links.values():
                link.close()
            self._loop.stop()
            done.set()

        self._loop.call_soon_threadsafe(shutdown)
        done.wait(5)
        self._thread.join(5)
        self._thread = None

    def __enter__(self) -> LinkEmulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            _small_buffers(sock, self.socket_buffer_bytes)  # inherited by accepted sockets
            sock.bind((host, port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        self._server = await loop.create_server(self._accept, sock=sock)
        self.address = sock.getsockname()[:2]
        t0 = loop.time()
        self.t0 = t0  # asyncio's clock is time.monotonic()
        q = self.queue_bytes
        self._links = {
            "up": _Link(loop, "up", self.up_trace, self.delay_ms, q, t0),
            "down": _Link(loop, "down", self.down_trace, self.delay_ms, q, t0),
        }

    def _accept(self) -> _Side:
        self._connections += 1
        return _Side(self, self._links["up"], self._links["down"], peer=None)

    async def _dial(self, client: _Side) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.upstream
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family, _, _, _, addr = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            _small_buffers(sock, self.socket_buffer_bytes)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, addr)
            except BaseException:
                sock.close()
                raise
            _, upstream = await loop.create_connection(
                lambda: _Side(self, self._links["down"], self._links["up"], peer=client), sock=sock
            )
        except OSError as exc:
            self._failed_connects += 1
            log.warning("upstream %s:%s unreachable (%s); closing the client", host, port, exc)
            if client.transport is not None:
                client.transport.abort()
            return
        if client.closed:
            upstream.transport.close()
            return
        client.transport.resume_reading()

    # observation
    def trace_ms(self, t_monotonic: float | None = None) -> float:
        """Trace time (ms since start) of a time.monotonic() value (default: now)."""
        if self.t0 is None:
            raise RuntimeError("LinkEmulator.trace_ms: not started")
        t = time.monotonic() if t_monotonic is None else t_monotonic
        return (t - self.t0) * 1e3

    def stats(self) -> dict:
        """Bytes delivered each way, bytes queued, connections; safe to call from any thread."""
        up, down = self._links.get("up"), self._links.get("down")
        return {
            "up_bytes": up.delivered if up else 0,
            "down_bytes": down.delivered if down else 0,
            "up_queued_bytes": up.queued if up else 0,
            "down_queued_bytes": down.queued if down else 0,
            "connections": self._connections,
            "open_sockets": len(self._sides),
            "failed_upstream_connects": self._failed_connects,
            "uptime_s": 0.0 if self.t0 is None else time.monotonic() - self.t0,
        }


# ---------------------------------------------------------------- measuring it


@dataclass
class Goodput:
    """Bytes a receiver got through the emulator over an interval vs the trace's capacity then."""

    trace: str
    direction: str
    seconds: float
    delay_ms: float
    bytes: int
    goodput_mbps: float
    capacity_mbps: float
    error: float  # goodput / capacity - 1
    per_second: list[tuple[float, float]] = field(default_factory=list)  # (goodput, capacity)


class _Receiver(threading.Thread):
    """Reads a socket until EOF, recording (monotonic time, bytes) per read."""

    def __init__(self, sock: socket.socket):
        super().__init__(name="goodput-receiver", daemon=True)
        self.sock, self.times, self.sizes = sock, [], []

    def run(self) -> None:
        buf = bytearray(1 << 20)
        times, sizes, sock = self.times, self.sizes, self.sock
        try:
            while True:
                n = sock.recv_into(buf)
                if n == 0:
                    return
                times.append(time.monotonic())
                sizes.append(n)
        except OSError:
            return


class _Pusher(threading.Thread):
    """Writes as fast as the socket takes it until told to stop."""

    def __init__(self, sock: socket.socket, stop: threading.Event, chunk: int = 1 << 16):
        super().__init__(name="goodput-pusher", daemon=True)
        self.sock, self.stop, self.payload = sock, stop, bytes(chunk)

    def run(self) -> None:
        self.sock.settimeout(0.2)  # wake up now and then to see `stop`
        view = memoryview(self.payload)
        try:
            while not self.stop.is_set():
                try:
                    self.sock.send(view)
                except TimeoutError:
                    continue
        except OSError:
            return


def measure_goodput(
    trace: str | Trace,
    seconds: float,
    *,
    direction: str = "up",
    delay_ms: float = 0.0,
    queue_bytes: int = DEFAULT_QUEUE_BYTES,
    warmup_s: float = 0.5,
) -> Goodput:
    """Push bytes through a fresh emulator as fast as TCP allows; count what the receiver gets.

    The measured interval is [warmup_s, warmup_s + seconds] after connecting, on the receiver's
    clock; the capacity is the trace's over the same interval shifted back by the delay.
    """
    if direction not in ("up", "down"):
        raise ValueError("direction is 'up' or 'down'")
    trace = load_trace(trace)
    fast = "const:1000"  # the direction not measured
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)  # the emulator dials it at once; don't hang if it cannot
    stop = threading.Event()
    up, down = (trace, fast) if direction == "up" else (fast, trace)
    emu = LinkEmulator(("127.0.0.1", 0), server.getsockname(), up, down, delay_ms, queue_bytes)
    with emu:
        client = socket.create_connection(emu.address)
        upstream, _ = server.accept()
        server.close()
        send_sock, recv_sock = (client, upstream) if direction == "up" else (upstream, client)
        receiver, pusher = _Receiver(recv_sock), _Pusher(send_sock, stop)
        t_start = time.monotonic() + warmup_s
        t_end = t_start + seconds
        receiver.start()
        pusher.start()
        time.sleep(max(0.0, t_end + 0.1 - time.monotonic()))
        stop.set()
        pusher.join()
        for s in (client, upstream):
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes the receiver's blocked recv
            except OSError:
                pass
            s.close()
        receiver.join(2)
        times, sizes = list(receiver.times), list(receiver.sizes)
        trace_start = emu.trace_ms(t_start) - delay_ms
    total = sum(n for t, n in zip(times, sizes) if t_start < t <= t_end)
    goodput = total * 8 / seconds / 1e6
    capacity = capacity_mbps(trace, trace_start, trace_start + seconds * 1e3)
    per_second = []
    for k in range(int(seconds)):
        a, b = t_start + k, t_start + k + 1
        got = sum(n for t, n in zip(times, sizes) if a < t <= b) * 8 / 1e6
        cap = capacity_mbps(trace, trace_start + k * 1e3, trace_start + (k + 1) * 1e3)
        per_second.append((round(got, 4), round(cap, 4)))
    return Goodput(
        trace=trace.name,
        direction=direction,
        seconds=seconds,
        delay_ms=delay_ms,
        bytes=total,
        goodput_mbps=goodput,
        capacity_mbps=capacity,
        error=goodput / capacity - 1 if capacity > 0 else float("nan"),
        per_second=per_second,
    )


def fidelity(trace: str | Trace, seconds: float, delay_ms: float = 0.0) -> dict:
    """Goodput through the emulator vs the trace's capacity over the same `seconds` (a dict)."""
    g = measure_goodput(trace, seconds, delay_ms=delay_ms)
    out = asdict(g)
    out["within_10pct"] = bool(abs(g.error) <= 0.10)  # False when the trace had no capacity
    if g.error != g.error:  # NaN: keep the JSON strict
        out["error"] = None
    return out


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--up", action="append", metavar="TRACE",
        help="uplink (client -> upstream) trace: a mahimahi file, a name in bench/traces/, or "
        "const:MBPS; with --fidelity it may be repeated",
    )
    parser.add_argument("--down", metavar="TRACE", help="downlink (upstream -> client) trace")
    parser.add_argument("--listen", metavar="HOST:PORT", help="where clients connect")
    parser.add_argument("--upstream", metavar="HOST:PORT", help="where connections are forwarded")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="fixed one-way delay (ms)")
    parser.add_argument(
        "--queue-bytes", type=int, default=DEFAULT_QUEUE_BYTES,
        help=f"bytes that may wait before each link (default {DEFAULT_QUEUE_BYTES})",
    )
    parser.add_argument("--report-s", type=float, default=5.0, help="print stats this often (s)")
    parser.add_argument(
        "--fidelity", type=float, metavar="SECONDS",
        help="instead of proxying: push bytes through each --up trace for SECONDS, compare the "
        "goodput with the trace's capacity, write bench/results/link.json",
    )


def _trace_table(title: str, traces: dict[str, Trace]):
    from rich.table import Table

    table = Table(title=title)
    for col in ("link", "trace", "period s", "mean Mbit/s", "p5 (1 s)", "p50", "p95", "outage"):
        left = col in ("link", "trace")
        table.add_column(col, justify="left" if left else "right", no_wrap=left)
    for name, t in traces.items():
        s = trace_stats(t)
        table.add_row(
            name, t.name, f"{s.duration_s:g}", f"{s.mean_mbps:.2f}", f"{s.p5_mbps:.2f}",
            f"{s.p50_mbps:.2f}", f"{s.p95_mbps:.2f}", f"{100 * s.zero_windows:.1f}%",
        )
    return table


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _run_fidelity(args) -> int:
    from rich.console import Console
    from rich.table import Table

    specs = args.up or ["const:8", "ATT-LTE-driving-2016.up"]
    traces = {spec: load_trace(spec) for spec in specs}
    console = Console()
    title = f"link emulator fidelity: goodput vs capacity (Mbit/s), {args.fidelity:g} s"
    table = Table(title=title)
    for col in ("trace", "goodput", "capacity", "error", "worst 1 s", "ok (10%)"):
        table.add_column(col, justify="left" if col == "trace" else "right", no_wrap=True)
    results = []
    for spec, trace in traces.items():
        with console.status(f"pushing bytes through {trace.name} for {args.fidelity:g} s"):
            r = fidelity(trace, args.fidelity, delay_ms=args.delay_ms)
        results.append(r)
        worst = max((abs(g / c - 1) for g, c in r["per_second"] if c > 0), default=float("nan"))
        table.add_row(
            r["trace"], f"{r['goodput_mbps']:.3f}", f"{r['capacity_mbps']:.3f}",
            "n/a" if r["error"] is None else f"{100 * r['error']:+.1f}%", f"{100 * worst:.1f}%",
            "yes" if r["within_10pct"] else "NO",
        )
    console.print(table)
    path = RESULTS / "link.json"
    _write_json(path, {"benchmark": "link", "seconds": args.fidelity, "results": results})
    console.print(f"wrote {path}")
    return 0


def run(args) -> int:
    if args.fidelity is not None:
        if args.fidelity <= 0:
            raise UserError("--fidelity SECONDS must be positive")
        return _run_fidelity(args)
    missing = [f for f in ("up", "down", "listen", "upstream") if not getattr(args, f)]
    if missing:
        raise UserError(
            "the proxy needs " + ", ".join(f"--{m}" for m in missing)
            + " (or --fidelity SECONDS to measure the emulator)"
        )
    if len(args.up) != 1:
        raise UserError("give one --up trace for the proxy (several only with --fidelity)")
    from rich.console import Console

    console = Console()
    emu = LinkEmulator(
        args.listen, args.upstream, args.up[0], args.down, args.delay_ms, args.queue_bytes
    )
    console.print(_trace_table("link emulator", {"up": emu.up_trace, "down": emu.down_trace}))
    emu.start()
    host, port = emu.address
    console.print(
        f"listening on {host}:{port} -> {args.upstream}, one-way delay {args.delay_ms:g} ms, "
        f"queue {args.queue_bytes} B per link; Ctrl-C stops",
        soft_wrap=True, highlight=False,
    )
    last, last_t = emu.stats(), time.monotonic()
    try:
        while True:
            time.sleep(max(args.report_s, 0.1))
            now, now_t = emu.stats(), time.monotonic()
            dt = now_t - last_t
            up = 8e-6 * (now["up_bytes"] - last["up_bytes"]) / dt
            down = 8e-6 * (now["down_bytes"] - last["down_bytes"]) / dt
            console.print(
                f"[{now['uptime_s']:7.1f} s] up {up:7.3f} Mbit/s (queued "
                f"{now['up_queued_bytes']} B), down {down:7.3f} Mbit/s (queued "
                f"{now['down_queued_bytes']} B), {now['open_sockets'] // 2} open",
                soft_wrap=True, highlight=False,
            )
            last, last_t = now, now_t
    except KeyboardInterrupt:
        pass
    finally:
        emu.stop()
    s = emu.stats()
    console.print(
        f"stopped: {s['up_bytes']} B up, {s['down_bytes']} B down, {s['connections']} connections"
    )
    return 0
