"""Read a CSI file of any supported format into a CSICapture.

Formats (name: what, how it is recognised from its content, not its name):
  intel5300   Linux 802.11n CSI Tool .dat: big-endian length-prefixed records, code 0xbb (csiread)
  atheros     Atheros CSI Tool .dat: length-prefixed records, little or big endian (csiread)
  nexmon      nexmon_csi .pcap (csiread; chip from the header's chip word or by CSI smoothness,
              bandwidth from the packet size; the packets of one frame become (rx core, stream))
  picoscenes  PicoScenes .csi: length-prefixed frames with magic 0x20150315 (csiread)
  esp32       ESP32-CSI-Tool CSV lines (edge/csi/esp32.py, the parser the UDP source uses too)
  npy / npz   complex arrays (time, subcarrier[, rx[, tx]]); npz keys: csi, optional timestamps, fs

Before csiread sees a binary file, its record chain is walked here: a file that ends inside a
record is "truncated", a record whose length or layout fields make no sense is "corrupt"; both are
a UserError naming the file and the format (allow_truncated=True reads the complete records).
A format name may carry options: "atheros:big", "nexmon:4358", "nexmon:4358:80".
"""

from __future__ import annotations

import logging
import os
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from coach_runtime.errors import UserError
from edge.csi import esp32
from edge.csi.capture import CSICapture, finish_capture, remove_chain_phase_jumps, unwrap_counter

log = logging.getLogger(__name__)

FORMATS = ("intel5300", "atheros", "nexmon", "picoscenes", "esp32", "npy", "npz")
ALIASES = {"intel": "intel5300", "iwl5300": "intel5300", "5300": "intel5300", "ath": "atheros",
           "pcap": "nexmon", "csv": "esp32", "pico": "picoscenes"}
NEXMON_CHIPS = ("4339", "43455c0", "4358", "4366c0")
# nexmon_csi's 16-bit chip word (as csiread reads it, little endian) -> chip; values seen in the wild
NEXMON_CHIP_WORDS = {0x0001: "4339", 0x0065: "43455c0", 0xA6DC: "43455c0", 0x0003: "4358",
                     0xDEAD: "4358", 0xE834: "4366c0"}
PCAP_MAGICS = {b"\xd4\xc3\xb2\xa1": "<", b"\xa1\xb2\xc3\xd4": ">", b"\x4d\x3c\xb2\xa1": "<",
               b"\xa1\xb2\x3c\x4d": ">"}
PICOSCENES_MAGIC = 0x20150315


class FormatError(Exception):
    """The bytes do not fit the format (message says where); turned into a UserError by read_csi."""


class Truncated(FormatError):
    def __init__(self, msg: str, complete: int):
        super().__init__(msg)
        self.complete = complete  # records that are whole


# ---------------------------------------------------------------------------------------------
# public entry points


def read_csi(
    path: str | os.PathLike,
    fmt: str | None = None,
    *,
    fs: float | None = None,
    allow_truncated: bool = False,
) -> CSICapture:
    """Read a CSI capture; detect the format from the content unless fmt names it.

    fs is the sampling rate for array files that carry no timestamps (default 1000 Hz, noted in
    meta["fs_assumed"]). Returns the packets as they came (not resampled): see resample_uniform.
    Any failure a user can cause is a one-line UserError naming the file and the format tried.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file")
    if p.is_dir():
        raise UserError(f"{p}: is a directory; give one CSI file")
    name, opts = _split_fmt(fmt) if fmt else (detect_format(p), [])
    reader = READERS[name]
    try:
        return reader(p, opts, fs=fs, allow_truncated=allow_truncated)
    except UserError:
        raise
    except Truncated as exc:
        rescue = (f"or read its {exc.complete} complete records with --allow-truncated" if exc.complete
                  else "nothing in it is complete")
        raise UserError(f"{p}: truncated {name} file ({exc}); re-copy it, {rescue}") from None
    except FormatError as exc:
        raise UserError(f"{p}: corrupt, or not {name} data ({exc})") from None
    except (ValueError, IndexError, KeyError, OSError, EOFError, struct.error, zipfile.BadZipFile) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{p}: cannot read as {name} ({msg})") from None


def detect_format(path: str | os.PathLike) -> str:
    """The format of a CSI file from its first bytes (and a walk over its first records)."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(1 << 16)
    except OSError as exc:
        raise UserError(f"{p}: cannot open ({exc.strerror})") from None
    if len(head) == 0:
        raise UserError(f"{p}: empty file, not a CSI capture")
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "npz"
    if head[:4] in PCAP_MAGICS:
        return "nexmon"
    if len(head) >= 8 and struct.unpack("<I", head[4:8])[0] == PICOSCENES_MAGIC:
        return "picoscenes"
    if b"CSI_DATA" in head[:4096]:
        return "esp32"
    for name, probe in (("intel5300", _probe_intel), ("atheros", _probe_atheros)):
        if probe(head):
            return name
    raise UserError(
        f"{p}: unknown CSI format (tried {', '.join(FORMATS)}); "
        "pass --format NAME if you know what it is")


# ---------------------------------------------------------------------------------------------
# record walkers: validate the byte layout, count whole records


def _walk_intel(b: bytes, limit: int | None = None) -> int:
    """Number of 0xbb (bfee) records; raises FormatError/Truncated. Walks `limit` records at most."""
    off = n_rec = n_bfee = 0
    while off < len(b):
        if limit is not None and n_rec >= limit:
            return n_bfee
        if off + 3 > len(b):
            raise Truncated(f"record header cut at byte {off} of {len(b)}", n_bfee)
        size, code = struct.unpack(">HB", b[off : off + 3])
        if size < 1:
            raise FormatError(f"record of length 0 at byte {off}")
        if off + 2 + size > len(b):
            raise Truncated(f"last record at byte {off} needs {size + 2} bytes, {len(b) - off} left", n_bfee)
        if code == 0xBB:
            if size - 1 < 20:
                raise FormatError(f"bfee record too short at byte {off}")
            nrx, ntx = b[off + 11], b[off + 12]
            (plen,) = struct.unpack("<H", b[off + 19 : off + 21])
            want = (30 * (nrx * ntx * 8 * 2 + 3) + 7) // 8
            if not (1 <= nrx <= 3 and 1 <= ntx <= 3) or plen != want or size - 1 < 20 + plen:
                raise FormatError(f"bad bfee record at byte {off} (Nrx={nrx}, Ntx={ntx}, len={plen})")
            n_bfee += 1
        elif code not in (0xC1,):
            raise FormatError(f"unknown record code 0x{code:02x} at byte {off}")
        n_rec += 1
        off += 2 + size
    return n_bfee


def _walk_atheros(b: bytes, endian: str, limit: int | None = None) -> tuple[int, int]:
    """(records, tones) of an Atheros CSI Tool file; raises FormatError/Truncated."""
    e = "<" if endian == "little" else ">"
    off = n = 0
    tones_seen = 0
    hdr = struct.Struct(e + "HQHHBBBBBBBBBBBH")  # field_len + 25-byte header
    while off < len(b):
        if limit is not None and n >= limit:
            break
        if off + hdr.size > len(b):
            raise Truncated(f"record header cut at byte {off} of {len(b)}", n)
        (field_len, _ts, csi_len, _ch, _err, _nf, _rate, _bw, tones, nr, nc, *_rssi, pl_len) = hdr.unpack_from(b, off)
        if field_len != 25 + csi_len + pl_len:
            raise FormatError(f"record length {field_len} != 25 + {csi_len} + {pl_len} at byte {off}")
        if csi_len:
            if tones not in (56, 114) or not (1 <= nr <= 3 and 1 <= nc <= 3):
                raise FormatError(f"bad layout tones={tones} nr={nr} nc={nc} at byte {off}")
            if csi_len != tones * nr * nc * 20 // 8:
                raise FormatError(f"csi_len {csi_len} does not match {tones}x{nr}x{nc} at byte {off}")
            tones_seen = tones_seen or tones
        if off + 2 + field_len > len(b):
            raise Truncated(f"last record at byte {off} needs {field_len + 2} bytes, {len(b) - off} left", n)
        n += 1
        off += 2 + field_len
    return n, tones_seen


def _walk_picoscenes(b: bytes) -> int:
    off = n = 0
    while off < len(b):
        if off + 8 > len(b):
            raise Truncated(f"frame header cut at byte {off} of {len(b)}", n)
        size, magic = struct.unpack("<II", b[off : off + 8])
        if magic != PICOSCENES_MAGIC:
            raise FormatError(f"frame at byte {off} lacks the PicoScenes magic")
        if off + 4 + size > len(b):
            raise Truncated(f"last frame at byte {off} needs {size + 4} bytes, {len(b) - off} left", n)
        n += 1
        off += 4 + size
    return n


def _walk_pcap(b: bytes) -> list[int]:
    """incl_len of each packet of a pcap file."""
    if len(b) < 24 or b[:4] not in PCAP_MAGICS:
        raise FormatError("no pcap global header")
    e = PCAP_MAGICS[b[:4]]
    (snaplen,) = struct.unpack(e + "I", b[16:20])
    off, sizes = 24, []
    while off < len(b):
        if off + 16 > len(b):
            raise Truncated(f"packet header cut at byte {off} of {len(b)}", len(sizes))
        incl, orig = struct.unpack(e + "II", b[off + 8 : off + 16])
        if incl > max(snaplen, 1 << 18) or incl > orig + (1 << 16):
            raise FormatError(f"packet at byte {off} claims {incl} bytes")
        if off + 16 + incl > len(b):
            raise Truncated(f"last packet at byte {off} needs {incl + 16} bytes, {len(b) - off} left", len(sizes))
        sizes.append(incl)
        off += 16 + incl
    return sizes


def _probe_intel(head: bytes) -> bool:
    """Does the file start like a Linux 802.11n CSI Tool log? (first record's header fits)"""
    if len(head) < 3:
        return False
    size, code = struct.unpack(">HB", head[:3])
    if code == 0xC1:  # a non-CSI record first: let the walker decide
        try:
            return _walk_intel(head, limit=8) > 0
        except Truncated as exc:
            return exc.complete > 0
        except FormatError:
            return False
    if code != 0xBB:
        return False
    sizes = {21 + (30 * (r * t * 16 + 3) + 7) // 8 for r in (1, 2, 3) for t in (1, 2, 3)}
    if len(head) < 21:
        return any(size >= s for s in sizes)  # cut inside the first header: plausible length only
    nrx, ntx = head[11], head[12]
    (plen,) = struct.unpack("<H", head[19:21])
    return 1 <= nrx <= 3 and 1 <= ntx <= 3 and plen == (30 * (nrx * ntx * 16 + 3) + 7) // 8 and size >= 21 + plen


def _probe_atheros(head: bytes) -> bool:
    """Does the file start like an Atheros CSI Tool log (either byte order)?"""
    for e in ("<", ">"):
        if len(head) < 27:
            return False
        (field_len, _ts, csi_len, _ch, _err, _nf, _rate, _bw, tones, nr, nc, *_r, pl_len) = struct.unpack(
            e + "HQHHBBBBBBBBBBBH", head[:27])
        if field_len != 25 + csi_len + pl_len or csi_len == 0:
            continue
        if tones in (56, 114) and 1 <= nr <= 3 and 1 <= nc <= 3 and csi_len == tones * nr * nc * 20 // 8:
            return True
    return False


def _complete(walk: Callable[[], object], allow_truncated: bool) -> int | None:
    """Run a walker; None if the file is whole, else the count of complete records (if allowed)."""
    try:
        walk()
        return None
    except Truncated as exc:
        if not allow_truncated or exc.complete == 0:
            raise
        log.warning("truncated file: reading its %d complete records", exc.complete)
        return exc.complete


# ---------------------------------------------------------------------------------------------
# readers


def _csiread():
    try:
        import csiread
    except ModuleNotFoundError:
        raise UserError("reading this CSI format needs csiread: pip install 'coach-runtime[edge]'") from None
    return csiread


def _mode(x: np.ndarray) -> int:
    vals, counts = np.unique(np.asarray(x).astype(np.int64), return_counts=True)
    return int(vals[np.argmax(counts)])


def _layout_counts(nrx: np.ndarray, ntx: np.ndarray) -> dict[str, int]:
    pairs, counts = np.unique(np.stack([nrx, ntx], 1).astype(int), axis=0, return_counts=True)
    return {f"{r}x{t}": int(c) for (r, t), c in zip(pairs, counts)}


def _read_intel(p: Path, opts: list[str], *, fs=None, allow_truncated=False) -> CSICapture:
    b = p.read_bytes()
    n_whole = _complete(lambda: _walk_intel(b), allow_truncated)
    c = _csiread().Intel(str(p), nrxnum=3, ntxnum=3, if_report=False, bufsize=n_whole or 0)
    c.read()
    if c.count == 0:
        raise FormatError("no CSI (0xbb) records")
    nrx, ntx = _mode(c.Nrx), _mode(c.Ntx)
    csi = np.asarray(c.csi)[: c.count, :, :nrx, :ntx]
    # a packet with fewer chains than the common layout has zeros there (missing); with more, the
    # extra chains are dropped
    ts = unwrap_counter(np.asarray(c.timestamp_low[: c.count]), 32) * 1e-6
    bf = np.asarray(c.bfee_count[: c.count]).astype(np.int64)
    meta = {
        "device": "Intel 5300 (Linux 802.11n CSI Tool)",
        "layout": {"rx": nrx, "tx": ntx, "subcarriers": 30},
        "packet_layouts": _layout_counts(c.Nrx[: c.count], c.Ntx[: c.count]),
        "perm": np.asarray(c.perm[: c.count])[0].tolist() if c.count else None,
        "rssi_mean": [float(np.mean(getattr(c, k)[: c.count])) for k in ("rssi_a", "rssi_b", "rssi_c")],
        "dropped_measurements": int(np.clip(np.diff(bf) - 1, 0, None).sum()) if bf.size > 1 else 0,
        "truncated": n_whole is not None,
    }
    csi, meta["chain_phase_jumps_removed"] = remove_chain_phase_jumps(csi)
    return finish_capture(csi, ts, "intel5300", str(p), meta)


def _read_atheros(p: Path, opts: list[str], *, fs=None, allow_truncated=False) -> CSICapture:
    b = p.read_bytes()
    endians = [opts[0]] if opts else ["little", "big"]
    last_exc: FormatError | None = None
    for endian in endians:
        if endian not in ("little", "big"):
            raise UserError(f"{p}: atheros option must be 'little' or 'big', got {endian!r}")
        try:
            n_whole = _complete(lambda e=endian: _walk_atheros(b, e), allow_truncated)
            _, tones = _walk_atheros(b, endian, limit=n_whole)
            break
        except Truncated:
            raise
        except FormatError as exc:
            last_exc = exc
    else:
        raise last_exc or FormatError("no records")
    if not tones:
        raise FormatError("no CSI in any record")
    c = _csiread().Atheros(str(p), nrxnum=3, ntxnum=3, tones=tones, if_report=False, bufsize=n_whole or 0)
    c.read(endian=endian)
    n = c.count
    if n == 0:
        raise FormatError("no CSI records")
    nr, nc = _mode(c.nr[:n]), _mode(c.nc[:n])
    csi = np.array(np.asarray(c.csi)[:n, :, :nr, :nc])
    err = np.asarray(c.err_info[:n]) != 0
    csi[err] = 0  # packets with a PHY error carry no trustworthy CSI: missing
    meta = {
        "device": "Atheros CSI Tool",
        "endian": endian,
        "layout": {"rx": nr, "tx": nc, "subcarriers": tones},
        "packet_layouts": _layout_counts(c.nr[:n], c.nc[:n]),
        "phy_error_packets": int(err.sum()),
        "channel_mhz": int(np.asarray(c.tx_channel)[0]),
        "rssi_mean": float(np.mean(c.rssi[:n])),
        "truncated": n_whole is not None,
    }
    return finish_capture(csi, np.asarray(c.timestamp[:n], np.float64) * 1e-6, "atheros", str(p), meta)


def _nexmon_bw(caplen: int) -> int:
    for bw in (20, 40, 80, 160):
        if caplen - 60 == int(3.2 * bw) * 4:
            return bw
    raise FormatError(f"packet size {caplen} fits no nexmon bandwidth (20/40/80/160 MHz)")


def _roughness(csi: np.ndarray) -> float:
    """How much CSI jumps between neighbouring subcarriers (real CSI is smooth over frequency)."""
    a = np.abs(csi)
    if not np.isfinite(csi).all() or a.mean() == 0 or (a == 0).mean() > 0.3:
        return np.inf
    return float(np.mean(np.abs(np.diff(csi, axis=-1))) / a.mean())


def _read_nexmon(p: Path, opts: list[str], *, fs=None, allow_truncated=False) -> CSICapture:
    b = p.read_bytes()
    n_whole = _complete(lambda: _walk_pcap(b), allow_truncated)
    sizes = _walk_pcap(b[: _pcap_prefix_len(b, n_whole)] if n_whole is not None else b)
    if not sizes:
        raise FormatError("no packets")
    bw = int(opts[1]) if len(opts) > 1 else _nexmon_bw(_mode(np.array(sizes)))
    csiread = _csiread()
    path = str(p)
    tmp = None
    if n_whole is not None:  # csiread reads files: hand it the complete prefix
        import tempfile

        tmp = tempfile.NamedTemporaryFile(suffix=".pcap", delete=False)
        tmp.write(b[: _pcap_prefix_len(b, n_whole)])
        tmp.close()
        path = tmp.name
    try:
        def parse(chip: str):
            c = csiread.Nexmon(path, chip=chip, bw=bw, if_report=False)
            c.read()
            return c

        if opts and opts[0]:
            chip, how = opts[0], "given"
            if chip not in NEXMON_CHIPS:
                raise UserError(f"{p}: nexmon chip must be one of {', '.join(NEXMON_CHIPS)}, got {chip!r}")
            c = parse(chip)
        else:
            c = parse("4358")
            word = int(np.asarray(c.chip_version)[0]) if c.count else -1
            chip, how = NEXMON_CHIP_WORDS.get(word, ""), "chip word"
            if chip and chip != "4358":
                c = parse(chip)
            elif not chip:  # unknown word: the chip whose decoding gives the smoothest CSI
                trials = {ch: parse(ch) for ch in NEXMON_CHIPS}
                chip = min(trials, key=lambda ch: _roughness(np.asarray(trials[ch].csi)))
                c, how = trials[chip], "smoothest CSI"
    finally:
        if tmp is not None:
            os.unlink(tmp.name)
    n = c.count
    if n == 0:
        raise FormatError("no CSI packets")
    raw = np.fft.fftshift(np.asarray(c.csi)[:n], axes=1)  # FFT order -> subcarrier -N/2..N/2-1
    core = np.asarray(c.core[:n]).astype(int)
    spatial = np.asarray(c.spatial[:n]).astype(int)
    seq = np.asarray(c.seq[:n]).astype(int)
    nano = bool(getattr(c, "nano", False))
    t = np.asarray(c.sec[:n], np.float64) + np.asarray(c.usec[:n], np.float64) * (1e-9 if nano else 1e-6)
    # one frame = consecutive packets with the same sequence number (one per core x stream)
    new_frame = np.concatenate([[True], (seq[1:] != seq[:-1])])
    frame = np.cumsum(new_frame) - 1
    cores, spats = np.unique(core), np.unique(spatial)
    ci = np.searchsorted(cores, core)
    si = np.searchsorted(spats, spatial)
    csi = np.zeros((frame[-1] + 1, raw.shape[1], cores.size, spats.size), np.complex64)
    csi[frame, :, ci, si] = raw
    ts = t[new_frame]
    meta = {
        "device": f"nexmon_csi bcm{chip} ({how})",
        "chip": chip,
        "bandwidth_mhz": bw,
        "layout": {"rx": int(cores.size), "tx": int(spats.size), "subcarriers": int(raw.shape[1]),
                   "rx_cores": cores.tolist(), "spatial_streams": spats.tolist()},
        "pcap_packets": int(n),
        "chanspec": int(np.asarray(c.chan_spec)[0]),
        "truncated": n_whole is not None,
    }
    return finish_capture(csi, ts, "nexmon", str(p), meta)


def _pcap_prefix_len(b: bytes, n_packets: int | None) -> int:
    e = PCAP_MAGICS[b[:4]]
    off = 24
    for _ in range(n_packets or 0):
        (incl,) = struct.unpack(e + "I", b[off + 8 : off + 12])
        off += 16 + incl
    return off


def _read_picoscenes(p: Path, opts: list[str], *, fs=None, allow_truncated=False) -> CSICapture:
    b = p.read_bytes()
    n_whole = _complete(lambda: _walk_picoscenes(b), allow_truncated)
    csiread = _csiread()
    first = csiread.Picoscenes(str(p), if_report=False, bufsize=n_whole or 0)
    first.read()
    if first.count == 0 or first.raw is None:
        raise FormatError("no frames")
    info = first.raw["CSI"]["Info"]
    nsc = int(info["NumTones"].max())
    nrx_all = info["NumRx"].astype(int)
    ntx_all = (info["NumTx"] + info["NumESS"]).astype(int)
    if nsc == 0:
        raise FormatError("no frame carries CSI")
    c = csiread.Picoscenes(str(p), pl_size={"CSI": [nsc, int(nrx_all.max()), int(ntx_all.max())]},
                           if_report=False, bufsize=n_whole or 0)
    c.read()
    n = c.count
    nrx, ntx = _mode(nrx_all[:n]), _mode(ntx_all[:n])
    csi = np.asarray(c.raw["CSI"]["CSI"])[:n, :, :nrx, :ntx]
    ts = np.asarray(c.raw["RxSBasic"]["Timestamp"][:n], np.float64) * 1e-6
    meta = {
        "device": f"PicoScenes (device type 0x{int(info['DeviceType'][0]):04x})",
        "layout": {"rx": nrx, "tx": ntx, "subcarriers": nsc},
        "packet_layouts": _layout_counts(nrx_all[:n], ntx_all[:n]),
        "subcarrier_index": np.asarray(c.raw["CSI"]["SubcarrierIndex"][0]).astype(int).tolist(),
        "carrier_mhz": float(info["CarrierFreq"][0]) / 1e6,
        "bandwidth_mhz": int(info["CBW"][0]),
        "truncated": n_whole is not None,
    }
    if int(info["DeviceType"][0]) == 0x5300:  # an Intel 5300 behind PicoScenes: same chain quirk
        csi, meta["chain_phase_jumps_removed"] = remove_chain_phase_jumps(csi)
    return finish_capture(csi, ts, "picoscenes", str(p), meta)


def _read_esp32(p: Path, opts: list[str], *, fs=None, allow_truncated=False) -> CSICapture:
    try:
        text = p.read_text(encoding="utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise FormatError(f"not text (byte {exc.start})") from None
    lines = text.splitlines()
    truncated = bool(text) and not text.endswith("\n")
    try:
        packets, _ = esp32.parse_lines(lines, strict=True)
    except esp32.LineError as exc:
        last = str(exc).startswith(f"line {len(lines)}:")
        if last and truncated:
            if not allow_truncated:
                raise Truncated(f"last line cut short: {exc}", len(lines) - 1) from None
            packets, _ = esp32.parse_lines(lines[:-1], strict=True)
        else:
            raise FormatError(str(exc)) from None
    if not packets:
        raise FormatError("no CSI_DATA lines")
    csi, ts_us, meta = esp32.stack_packets(packets)
    if ts_us is not None:
        ts = unwrap_counter(ts_us, 32) * 1e-6
    else:
        meta["fs_assumed"] = fs or 100.0
        ts = np.arange(len(packets)) / meta["fs_assumed"]
    meta.update({"device": "ESP32 (ESP32-CSI-Tool)", "layout": {"rx": 1, "tx": 1, "subcarriers": csi.shape[1]},
                 "truncated": truncated and allow_truncated})
    return finish_capture(csi, ts, "esp32", str(p), meta)


def _as_4d(a: np.ndarray, what: str) -> np.ndarray:
    if not np.iscomplexobj(a):
        if a.ndim >= 2 and a.shape[-1] == 2 and np.issubdtype(a.dtype, np.number):
            a = a[..., 0] + 1j * a[..., 1]  # trailing (real, imag)
        else:
            raise FormatError(f"{what} must be complex (or real with a trailing axis of 2), got {a.dtype} {a.shape}")
    if a.ndim == 2:
        a = a[:, :, None, None]
    elif a.ndim == 3:
        a = a[:, :, :, None]
    if a.ndim != 4:
        raise FormatError(f"{what} must be (time, subcarrier[, rx[, tx]]), got shape {a.shape}")
    return a


def _array_capture(a: np.ndarray, ts, fs, p: Path, fmt: str, meta: dict) -> CSICapture:
    if ts is None:
        meta["fs_assumed"] = float(fs or 1000.0)
        if fs is None:
            log.warning("%s has no timestamps or fs; assuming %.0f Hz", p, meta["fs_assumed"])
        ts = np.arange(a.shape[0]) / meta["fs_assumed"]
    return finish_capture(a, ts, fmt, str(p), meta, drop_null_subcarriers=False)


def _read_npy(p: Path, opts: list[str], *, fs=None, allow_truncated=False) -> CSICapture:
    a = np.load(p, allow_pickle=False)
    return _array_capture(_as_4d(a, "the array"), None, fs, p, "npy", {"device": "array file"})


def read_npz_receivers(p: str | os.PathLike, fs: float | None = None) -> tuple[list[np.ndarray], np.ndarray | None, float | None, dict]:
    """An npz of CSI: (list of receivers' CSI arrays, timestamps or None, fs or None, extras).

    Key 'csi' of shape (T, S[, R[, Tx]]) is one receiver; (C, T, S, R, Tx) is C receivers of one
    recording; (N, C, T, S, R, Tx) is N recordings (e.g. models/gesfi raw.npz), returned flattened
    with extras['recordings'] = N. Or keys rx0, rx1, ... one receiver each.
    Optional keys: timestamps (T,), fs, labels / y (N,).
    """
    p = Path(p)
    with np.load(p, allow_pickle=False) as z:
        keys = set(z.files)
        extras: dict = {"keys": sorted(keys)}
        f = float(z["fs"]) if "fs" in keys else fs
        ts = np.asarray(z["timestamps"], np.float64) if "timestamps" in keys else None
        for k in ("labels", "y"):
            if k in keys:
                extras["labels"] = np.asarray(z[k]).astype(int).reshape(-1)
        if "csi" in keys:
            a = np.asarray(z["csi"])
            if a.ndim == 6:
                extras["recordings"] = a.shape[0]
                rx = [_as_4d(a[n, c], "csi") for n in range(a.shape[0]) for c in range(a.shape[1])]
                extras["receivers_per_recording"] = a.shape[1]
            elif a.ndim == 5:
                rx = [_as_4d(a[c], "csi") for c in range(a.shape[0])]
            else:
                rx = [_as_4d(a, "csi")]
        elif any(k.startswith("rx") and k[2:].isdigit() for k in keys):
            names = sorted((k for k in keys if k.startswith("rx") and k[2:].isdigit()), key=lambda k: int(k[2:]))
            rx = [_as_4d(np.asarray(z[k]), k) for k in names]
        elif "X" in keys:
            raise FormatError("holds Doppler images (key X), not CSI: use it as an edge source (csi:PATH)")
        else:
            raise FormatError(f"no CSI array in it (want key 'csi' or rx0, rx1, ...; has {sorted(keys)})")
    extras.setdefault("receivers_per_recording", len(rx) if "recordings" not in extras else extras["receivers_per_recording"])
    return rx, ts, f, extras


def _read_npz(p: Path, opts: list[str], *, fs=None, allow_truncated=False) -> CSICapture:
    rx, ts, f, extras = read_npz_receivers(p, fs)
    meta = {"device": "array file", "receivers": extras["receivers_per_recording"],
            "recordings": extras.get("recordings", 1)}
    if len(rx) > 1:
        log.info("%s holds %d receivers; reading the first (the GesFi source uses all)", p, len(rx))
    return _array_capture(rx[0], ts, f, p, "npz", meta)


READERS: dict[str, Callable[..., CSICapture]] = {
    "intel5300": _read_intel,
    "atheros": _read_atheros,
    "nexmon": _read_nexmon,
    "picoscenes": _read_picoscenes,
    "esp32": _read_esp32,
    "npy": _read_npy,
    "npz": _read_npz,
}


def _split_fmt(fmt: str) -> tuple[str, list[str]]:
    name, *opts = fmt.strip().lower().split(":")
    name = ALIASES.get(name, name)
    if name not in READERS:
        raise UserError(f"unknown CSI format {fmt!r}; one of: {', '.join(FORMATS)}")
    return name, opts

