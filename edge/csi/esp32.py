"""ESP32-CSI-Tool CSV lines: one parser for files and for the live UDP stream.

A line looks like
    CSI_DATA,AP,3C:71:BF:6D:2A:78,-73,11,1,0,1,1,1,0,0,0,0,-93,0,1,1,80272146,0,101,0,0,80.36,384,[101 -48 5 0 ...]
The bracketed list holds int8 pairs (imaginary, real) per subcarrier. Column names come from a
header line ("type,role,mac,...") when the file has one, else the ESP32-CSI-Tool default order.
Serial-console noise (boot logs, blank lines) is skipped; a CSI_DATA line that is cut short or holds
garbage is an error for a file (it is truncated or corrupt) and a counted drop for a live stream.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

DEFAULT_COLUMNS = (
    "type,role,mac,rssi,rate,sig_mode,mcs,bandwidth,smoothing,not_sounding,aggregation,stbc,"
    "fec_coding,sgi,noise_floor,ampdu_cnt,channel,secondary_channel,local_timestamp,ant,sig_len,"
    "rx_state,real_time_set,real_timestamp,len,CSI_DATA"
).split(",")


class LineError(ValueError):
    """A CSI_DATA line that cannot be parsed."""


@dataclass
class ESP32Packet:
    csi: np.ndarray  # complex64 (subcarriers,)
    local_timestamp_us: int | None  # the ESP32's 32-bit microsecond clock, if the line has it
    rssi: int | None
    mac: str


def parse_line(line: str, columns: list[str] | tuple[str, ...] = DEFAULT_COLUMNS) -> ESP32Packet | None:
    """One CSV line -> ESP32Packet; None for a line that is not CSI (header, log, blank).

    Raises LineError for a CSI_DATA line that is cut short or malformed.
    """
    line = line.strip()
    if not line.startswith("CSI_DATA"):
        return None
    lb = line.find("[")
    rb = line.rfind("]")
    if lb < 0 or rb < lb:
        raise LineError("CSI list not closed (line cut short)")
    fields = line[:lb].rstrip(",").split(",")
    body = line[lb + 1 : rb].replace(",", " ").split()
    try:
        vals = np.array([int(v) for v in body], dtype=np.int32)
    except ValueError as exc:
        raise LineError(f"non-integer CSI value ({exc})") from None
    if vals.size < 2 or vals.size % 2:
        raise LineError(f"CSI list has {vals.size} values; want an even number >= 2")
    if np.abs(vals).max() > 32767:
        raise LineError("CSI value out of range")
    csi = (vals[1::2] + 1j * vals[0::2]).astype(np.complex64)  # pairs are (imag, real)
    named = dict(zip(columns, fields))
    return ESP32Packet(
        csi=csi,
        local_timestamp_us=_int_or_none(named.get("local_timestamp")),
        rssi=_int_or_none(named.get("rssi")),
        mac=named.get("mac", ""),
    )


def header_columns(line: str) -> list[str] | None:
    """Column names if `line` is an ESP32-CSI-Tool CSV header, else None."""
    s = line.strip()
    if s.startswith("type,") and "CSI_DATA" in s:
        return s.split(",")
    return None


def parse_lines(lines: Iterable[str], strict: bool = True) -> tuple[list[ESP32Packet], int]:
    """Parse many lines: (packets, number of bad CSI_DATA lines). strict raises on the first bad one
    as LineError('line N: ...')."""
    columns: list[str] | tuple[str, ...] = DEFAULT_COLUMNS
    packets, bad = [], 0
    for i, line in enumerate(lines, 1):
        cols = header_columns(line)
        if cols:
            columns = cols
            continue
        try:
            p = parse_line(line, columns)
        except LineError as exc:
            if strict:
                raise LineError(f"line {i}: {exc}") from None
            bad += 1
            continue
        if p is not None:
            packets.append(p)
    return packets, bad


def stack_packets(packets: list[ESP32Packet]) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Packets -> (csi (T, S, 1, 1) complex64, local timestamps in us or None, meta).

    S is the most common subcarrier count; packets of another length (e.g. an HT-LTF line among
    L-LTF lines) are kept as missing (zeros) and counted.
    """
    lengths = np.array([p.csi.size for p in packets])
    vals, counts = np.unique(lengths, return_counts=True)
    S = int(vals[np.argmax(counts)])
    csi = np.zeros((len(packets), S, 1, 1), np.complex64)
    odd = 0
    for i, p in enumerate(packets):
        if p.csi.size == S:
            csi[i, :, 0, 0] = p.csi
        else:
            odd += 1
    ts = [p.local_timestamp_us for p in packets]
    ts_arr = None if any(t is None for t in ts) else np.array(ts, np.float64)
    rssi = [p.rssi for p in packets if p.rssi is not None]
    meta = {"other_length_packets": odd, "rssi_mean": float(np.mean(rssi)) if rssi else None}
    return csi, ts_arr, meta


def _int_or_none(s: str | None) -> int | None:
    try:
        return int(s) if s is not None else None
    except ValueError:
        return None
