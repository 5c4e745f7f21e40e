"""Live CSI over UDP: ESP32-CSI-Tool CSV lines, one or more per datagram.

    with UDPSource("0.0.0.0", 5500) as src:
        for chunk in src:            # CSICapture of about chunk_s seconds of packets
            ...

A bad line is counted (src.stats["bad_lines"]) and dropped; the stream goes on. Timestamps are the
ESP32's microsecond clock when the lines carry it (unwrapped), else the arrival time. Chunk
timestamps start at 0; chunk.meta["t0_s"] is where they start on the stream's clock, so that
consecutive chunks line up. Null subcarriers are kept in chunks (every chunk has the same shape).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np

from coach_runtime.errors import UserError
from edge.csi import esp32
from edge.csi.capture import CSICapture, finish_capture

log = logging.getLogger(__name__)


class UDPSource:
    def __init__(
        self,
        host: str = "0.0.0.0",
        port: int = 5500,
        *,
        chunk_s: float = 0.25,
        chunk_packets: int = 1000,
        idle_timeout_s: float | None = None,
        max_packets: int | None = None,
    ):
        """Bind host:port (port 0 picks a free one: see .address). Iteration ends after
        idle_timeout_s without a datagram, after max_packets packets, or on close()."""
        self.chunk_s, self.chunk_packets = chunk_s, chunk_packets
        self.idle_timeout_s, self.max_packets = idle_timeout_s, max_packets
        self.stats = {"datagrams": 0, "packets": 0, "bad_lines": 0, "other_length": 0}
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        try:
            self._sock.bind((host, port))
        except OSError as exc:
            self._sock.close()
            raise UserError(f"cannot listen for CSI on udp://{host}:{port} ({exc.strerror}); pick another port") from None
        self._sock.settimeout(0.1)
        self._ts_last_raw: int | None = None
        self._ts_wraps = 0
        self._n_sub: int | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self._sock.getsockname()[:2]

    @property
    def url(self) -> str:
        host, port = self.address
        return f"udp://{host}:{port}"

    def close(self) -> None:
        self._stop.set()
        self._sock.close()

    def stop(self) -> None:
        """Ask a running iteration to end (thread-safe)."""
        self._stop.set()

    def __enter__(self) -> UDPSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def packets(self) -> Iterator[tuple[float, esp32.ESP32Packet]]:
        """(timestamp s on the stream clock, packet) as they arrive."""
        last_rx = time.monotonic()
        t_start = time.monotonic()
        while not self._stop.is_set():
            try:
                data, _ = self._sock.recvfrom(65535)
            except socket.timeout:
                if self.idle_timeout_s is not None and time.monotonic() - last_rx > self.idle_timeout_s:
                    return
                continue
            except OSError:  # closed under us
                return
            last_rx = time.monotonic()
            self.stats["datagrams"] += 1
            text = data.decode("utf-8", errors="replace")
            for line in text.splitlines():
                try:
                    pkt = esp32.parse_line(line)
                except esp32.LineError as exc:
                    self.stats["bad_lines"] += 1
                    log.debug("dropped a bad CSI line: %s", exc)
                    continue
                if pkt is None:
                    continue
                self.stats["packets"] += 1
                yield self._clock(pkt, last_rx - t_start), pkt
                if self.max_packets is not None and self.stats["packets"] >= self.max_packets:
                    return

    def _clock(self, pkt: esp32.ESP32Packet, arrival_s: float) -> float:
        raw = pkt.local_timestamp_us
        if raw is None:
            return arrival_s
        if self._ts_last_raw is not None and raw < self._ts_last_raw - (1 << 31):
            self._ts_wraps += 1
        self._ts_last_raw = raw
        return (raw + self._ts_wraps * float(1 << 32)) * 1e-6

    def __iter__(self) -> Iterator[CSICapture]:
        buf: list[tuple[float, esp32.ESP32Packet]] = []
        for t, pkt in self.packets():
            buf.append((t, pkt))
            if len(buf) >= self.chunk_packets or buf[-1][0] - buf[0][0] >= self.chunk_s:
                yield self._chunk(buf)
                buf = []
        if buf:
            yield self._chunk(buf)

    def _chunk(self, buf: list[tuple[float, esp32.ESP32Packet]]) -> CSICapture:
        pkts = [p for _, p in buf]
        if self._n_sub is None:  # the stream's subcarrier count: the first chunk's common length
            self._n_sub = int(np.bincount([p.csi.size for p in pkts]).argmax())
        S = self._n_sub
        csi = np.zeros((len(pkts), S, 1, 1), np.complex64)
        for i, p in enumerate(pkts):
            if p.csi.size == S:
                csi[i, :, 0, 0] = p.csi
            else:
                self.stats["other_length"] += 1
        ts = np.array([t for t, _ in buf], np.float64)
        meta = {"device": "ESP32 (ESP32-CSI-Tool, UDP)", "t0_s": float(ts.min()),
                "layout": {"rx": 1, "tx": 1, "subcarriers": S}}
        return finish_capture(csi, ts, "esp32-udp", self.url, meta, drop_null_subcarriers=False,
                              require_valid=False)
