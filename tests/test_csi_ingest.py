"""CSI ingestion (edge/csi): every real capture in /work/shared/data/csi, array files, resampling,
NaN/Inf repair, truncated/corrupt/unknown files, the live UDP source, `coach gesfi inspect`."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from coach_runtime.cli import main as coach
from coach_runtime.errors import UserError
from edge.csi import CSICapture, UDPSource, detect_format, read_csi, resample_uniform
from edge.csi import esp32
from edge.csi.capture import finish_capture, remove_chain_phase_jumps
from edge.csi.synthetic import synthetic_capture, synthetic_csi

SHARED = Path(__file__).resolve().parents[2] / "shared"
CSI_DIR = SHARED / "data" / "csi"

# what SOURCE.txt says about each file: format, packets, rx antennas, subcarriers (after dropping
# null tones for ESP32; nexmon: one frame of 4 pcap packets = 2 cores x 2 spatial streams)
EXPECTED = {
    "sample_0x1_ap.dat": ("intel5300", 540, 3, 30),
    "ath_csi_1.dat": ("atheros", 401, 3, 56),
    "example_csi.csv": ("esp32", 13, 1, None),
    "example.pcap": ("nexmon", 1, 2, 256),
    "rx_by_iwl5300.csi": ("picoscenes", 383, None, 30),
}


def real(name: str) -> Path:
    p = CSI_DIR / name
    if not p.exists():
        pytest.skip(f"shared CSI data not found at {p}")
    return p


def test_every_shared_capture_is_covered():
    if not CSI_DIR.exists():
        pytest.skip(f"shared CSI data not found at {CSI_DIR}")
    files = {p.name for p in CSI_DIR.iterdir() if p.suffix != ".txt"}
    assert files == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_read_real_capture(name):
    fmt, packets, rx, sub = EXPECTED[name]
    cap = read_csi(real(name))
    assert isinstance(cap, CSICapture)
    assert cap.format == fmt == detect_format(real(name))
    assert cap.csi.dtype == np.complex64 and cap.csi.ndim == 4
    assert cap.n_packets == packets
    if rx is not None:
        assert cap.csi.shape[2] == rx
    if sub is not None:
        assert cap.csi.shape[1] == sub
    assert np.isfinite(cap.csi).all()
    assert cap.timestamps.dtype == np.float64 and cap.timestamps.shape == (cap.n_packets,)
    assert cap.timestamps[0] == 0 and np.all(np.diff(cap.timestamps) >= 0)
    if cap.n_packets > 1:
        assert cap.fs > 0
    lay = cap.meta["layout"]
    assert (lay["rx"], lay["tx"], lay["subcarriers"]) == cap.csi.shape[2:] + cap.csi.shape[1:2]
    assert np.abs(cap.csi).max() > 0


def test_intel_details():
    cap = read_csi(real("sample_0x1_ap.dat"))
    assert cap.csi.shape == (540, 30, 3, 2)  # Ntx = 2 in every packet: the third tx slot is dropped
    assert cap.meta["packet_layouts"] == {"3x2": 540}
    assert not cap.uniform and 9 < cap.fs < 11  # AP mode, about 10 packets/s, irregular
    # the pi/2 chain phase jumps are removed: the antenna ratio of this static scene is steady
    assert cap.meta["chain_phase_jumps_removed"] > 100
    r = cap.csi[:, :, 2, 0] / cap.csi[:, :, 1, 0]
    steps = np.angle((r[1:] * np.conj(r[:-1])).sum(axis=1))
    assert np.percentile(np.abs(steps), 99) < 0.2
    raw = np.asarray(_csiread_intel(real("sample_0x1_ap.dat")))
    r0 = raw[:, :, 2, 0] / raw[:, :, 1, 0]
    steps0 = np.angle((r0[1:] * np.conj(r0[:-1])).sum(axis=1))
    assert np.percentile(np.abs(steps0), 99) > 1.0  # the raw data does jump (the fix is needed)


def _csiread_intel(p: Path):
    csiread = pytest.importorskip("csiread")
    c = csiread.Intel(str(p), nrxnum=3, ntxnum=2, if_report=False)
    c.read()
    return c.csi


def test_picoscenes_mixed_layouts():
    cap = read_csi(real("rx_by_iwl5300.csi"))
    # packets carry 1, 2 or 3 rx: the common layout (2 rx x 1 tx) is kept, the rest counted
    assert cap.csi.shape[2:] == (2, 1)
    assert sum(cap.meta["packet_layouts"].values()) == 383 and len(cap.meta["packet_layouts"]) > 1
    assert cap.meta["missing_entries"] > 0  # the 1-rx packets lack rx1


def test_esp32_parser_matches_csiread_and_drops_null_tones():
    csiread = pytest.importorskip("csiread")
    p = real("example_csi.csv")
    ref = csiread.ESP32(str(p), if_report=False)
    ref.read()
    packets, bad = esp32.parse_lines(p.read_text().splitlines())
    assert bad == 0 and len(packets) == ref.count
    np.testing.assert_array_equal(np.stack([q.csi for q in packets]), ref.csi.astype(np.complex64))
    assert [q.local_timestamp_us for q in packets] == list(ref.local_timestamp)
    cap = read_csi(p)
    assert cap.meta["layout"]["subcarriers_raw"] == 64 and cap.csi.shape[1] < 64
    kept = cap.meta["subcarriers_kept"]
    np.testing.assert_array_equal(cap.csi[:, :, 0, 0], ref.csi[:, kept])
    # dropped columns are all-zero or bit-identical in every packet
    for k in set(range(64)) - set(kept):
        col = ref.csi[:, k]
        assert (col == col[0]).all()


def test_nexmon_frame_grouping():
    cap = read_csi(real("example.pcap"))
    assert cap.meta["chip"] == "4358" and cap.meta["bandwidth_mhz"] == 80
    assert cap.meta["pcap_packets"] == 4
    assert cap.csi.shape == (1, 256, 2, 2) and (np.abs(cap.csi) > 0).mean() > 0.9
    # explicit chip/bandwidth options give the same
    same = read_csi(real("example.pcap"), "nexmon:4358:80")
    np.testing.assert_array_equal(same.csi, cap.csi)


# ---------------------------------------------------------------------------------------------
# arrays


def test_npy_npz_roundtrip(tmp_path):
    x = synthetic_csi(300, n_rx=2, seed=1)
    np.save(tmp_path / "a.npy", x)
    cap = read_csi(tmp_path / "a.npy", fs=500.0)
    np.testing.assert_array_equal(cap.csi, x)
    assert cap.fs == pytest.approx(500.0) and cap.meta["fs_assumed"] == 500.0
    ts = np.cumsum(np.full(300, 0.002))
    np.savez(tmp_path / "b.npz", csi=x, timestamps=ts)
    cap = read_csi(tmp_path / "b.npz")
    assert cap.format == "npz" and cap.fs == pytest.approx(500.0)
    np.testing.assert_allclose(cap.timestamps, ts - ts[0])
    # real arrays with a trailing (real, imag) axis, and 2-D (time, subcarrier)
    np.save(tmp_path / "c.npy", np.stack([x.real, x.imag], -1)[:, :, 0, 0])
    assert read_csi(tmp_path / "c.npy").csi.shape == (300, 30, 1, 1)
    # several receivers: read_csi gives the first, with the count in meta
    np.savez(tmp_path / "d.npz", csi=np.stack([x, x * 2]), fs=1000.0)
    cap = read_csi(tmp_path / "d.npz")
    assert cap.meta["receivers"] == 2 and cap.fs == pytest.approx(1000.0)
    np.savez(tmp_path / "e.npz", X=np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(UserError, match="images"):
        read_csi(tmp_path / "e.npz")
    np.save(tmp_path / "f.npy", np.zeros((10, 3), np.float32))
    with pytest.raises(UserError, match="f.npy.*complex"):
        read_csi(tmp_path / "f.npy")


def test_nan_inf_are_marked_missing_or_refused(tmp_path):
    x = synthetic_csi(200, seed=2)
    x[5, 3, 1, 0] = np.nan
    x[9, :, 2, 0] = np.inf
    np.save(tmp_path / "nan.npy", x)
    cap = read_csi(tmp_path / "nan.npy")
    assert np.isfinite(cap.csi).all()
    assert cap.meta["nonfinite_values"] == 1 + 30
    assert cap.csi[5, 3, 1, 0] == 0 and (cap.csi[9, :, 2, 0] == 0).all()
    np.save(tmp_path / "allnan.npy", np.full((20, 30, 3, 1), np.nan, np.complex64))
    with pytest.raises(UserError, match="allnan.npy.*zero or not finite"):
        read_csi(tmp_path / "allnan.npy")


# ---------------------------------------------------------------------------------------------
# resampling


def test_resample_irregular_capture():
    cap = synthetic_capture(n_packets=800, fs=500.0, jitter=0.45, path_rate=0.5, n_rx=2, seed=3)
    assert not cap.uniform
    res = resample_uniform(cap, 1000.0)
    assert res.uniform and res.fs == 1000.0
    assert np.allclose(np.diff(res.timestamps), 1e-3)
    assert res.csi.shape[1:] == cap.csi.shape[1:] and res.csi.dtype == np.complex64
    # the resampled ratio follows the true ratio (the phase offsets cancel in both)
    truth = synthetic_csi(times=res.timestamps + cap.meta["t0_s"], fs=500.0, path_rate=0.5, n_rx=2, seed=3)
    r_res = res.csi[:, :, 1, 0] / res.csi[:, :, 0, 0]
    r_true = truth[:, :, 1, 0] / truth[:, :, 0, 0]
    err = np.median(np.abs(r_res - r_true)) / np.median(np.abs(r_true))
    assert err < 0.05
    # default fs: the nominal rate
    assert resample_uniform(cap).fs == pytest.approx(cap.fs)


def test_resample_keeps_missing_entries_out_of_the_mix():
    x = synthetic_csi(100, n_rx=2, seed=4)
    x[50, :, 1, 0] = 0  # missing in one packet
    cap = finish_capture(x, np.arange(100) / 100.0, "npy", "t", {}, drop_null_subcarriers=False)
    res = resample_uniform(cap, 400.0)
    near = np.abs(res.timestamps - 0.5) < 0.012  # grid points around the missing packet
    assert (res.csi[near][:, :, 1, 0] != 0).all()  # filled from the good neighbour, not dragged to 0


def test_chain_phase_jump_removal_on_synthetic():
    x = synthetic_csi(400, n_rx=3, noise=0.01, seed=5)
    jumps = np.cumsum(np.random.default_rng(5).integers(-1, 2, size=(400, 3)) * (np.random.default_rng(6).random((400, 3)) < 0.05), axis=0)
    jumps[:, 0] = 0
    xj = (x * np.exp(1j * np.pi / 2 * jumps)[:, None, :, None]).astype(np.complex64)
    fixed, n = remove_chain_phase_jumps(xj)
    assert n > 0
    r_fixed = fixed[:, :, 1, 0] / fixed[:, :, 0, 0]
    r_true = x[:, :, 1, 0] / x[:, :, 0, 0]
    # equal up to one constant pi/2 multiple
    rot = np.angle((r_fixed * np.conj(r_true)).mean())
    assert np.allclose(np.abs(r_fixed - r_true * np.exp(1j * rot)), 0, atol=1e-3 * np.abs(r_true).max())


# ---------------------------------------------------------------------------------------------
# truncated, corrupt, unknown


@pytest.mark.parametrize("name", ["sample_0x1_ap.dat", "ath_csi_1.dat", "example.pcap", "rx_by_iwl5300.csi",
                                  "example_csi.csv"])
def test_truncated_copy_is_a_one_line_error(tmp_path, name):
    fmt = EXPECTED[name][0]
    data = real(name).read_bytes()
    cut = tmp_path / f"cut_{name}"
    cut.write_bytes(data[: len(data) - 7])  # mid-record
    with pytest.raises(UserError) as err:
        read_csi(cut)
    msg = str(err.value)
    assert "\n" not in msg and str(cut) in msg and fmt in msg and "truncated" in msg
    # the complete records can still be read on request
    part = read_csi(cut, allow_truncated=True)
    assert 0 < part.n_packets <= read_csi(real(name)).n_packets
    assert part.meta["truncated"]


@pytest.mark.parametrize("name", ["sample_0x1_ap.dat", "ath_csi_1.dat", "rx_by_iwl5300.csi"])
def test_corrupt_record_header_is_a_one_line_error(tmp_path, name):
    fmt = EXPECTED[name][0]
    data = bytearray(real(name).read_bytes())
    # break the length field of a record in the middle of the file
    off = _record_offsets(bytes(data), fmt)[5]
    data[off : off + 2] = b"\x7f\x7f"
    bad = tmp_path / f"bad_{name}"
    bad.write_bytes(bytes(data))
    with pytest.raises(UserError) as err:
        read_csi(bad)
    msg = str(err.value)
    assert "\n" not in msg and str(bad) in msg and fmt in msg


def _record_offsets(b: bytes, fmt: str) -> list[int]:
    import struct

    offs, off = [], 0
    while off < len(b) and len(offs) < 10:
        offs.append(off)
        if fmt == "intel5300":
            off += 2 + struct.unpack(">H", b[off : off + 2])[0]
        elif fmt == "atheros":
            off += 2 + struct.unpack("<H", b[off : off + 2])[0]
        else:
            off += 4 + struct.unpack("<I", b[off : off + 4])[0]
    return offs


def test_unknown_empty_and_wrong_format(tmp_path):
    junk = tmp_path / "junk.dat"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(UserError, match=r"junk\.dat: unknown CSI format \(tried intel5300"):
        read_csi(junk)
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="empty.csv: empty file"):
        read_csi(empty)
    with pytest.raises(UserError, match=r"ath_csi_1\.dat.*intel5300"):
        read_csi(real("ath_csi_1.dat"), "intel5300")
    with pytest.raises(UserError, match="unknown CSI format 'foo'"):
        read_csi(real("ath_csi_1.dat"), "foo")
    with pytest.raises(UserError, match="no such file"):
        read_csi(tmp_path / "missing.dat")
    bad_line = tmp_path / "bad.csv"
    bad_line.write_text(real("example_csi.csv").read_text().replace("[101 -48", "[101 x48", 1))
    with pytest.raises(UserError, match=r"bad\.csv.*esp32.*line 1"):
        read_csi(bad_line)


# ---------------------------------------------------------------------------------------------
# live UDP


def test_udp_source_receives_esp32_lines():
    lines = real("example_csi.csv").read_text().splitlines()
    with UDPSource("127.0.0.1", 0, idle_timeout_s=1.0, chunk_s=10.0, chunk_packets=5) as src:
        host, port = src.address

        def send():
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for i, line in enumerate(lines):
                    s.sendto((line + "\n").encode(), (host, port))
                    if i == 3:
                        s.sendto(b"CSI_DATA,AP,broken line [1 2 3", (host, port))  # counted, dropped
                        s.sendto(b"I (1234) wifi: boot log noise\n", (host, port))  # ignored
                    time.sleep(0.002)

        th = threading.Thread(target=send)
        th.start()
        chunks = list(src)
        th.join()
    got = np.concatenate([c.csi for c in chunks])
    ref = read_csi(real("example_csi.csv"), )
    assert got.shape[0] == 13 and src.stats["bad_lines"] == 1 and src.stats["packets"] == 13
    np.testing.assert_array_equal(got[:, ref.meta["subcarriers_kept"]], ref.csi)
    assert [len(c.csi) for c in chunks] == [5, 5, 3]
    t = np.concatenate([c.timestamps + c.meta["t0_s"] for c in chunks])
    np.testing.assert_allclose(t - t[0], ref.timestamps, atol=1e-9)


def test_udp_busy_port_is_a_user_error():
    with UDPSource("127.0.0.1", 0) as a:
        with pytest.raises(UserError, match="cannot listen"):
            UDPSource("127.0.0.1", a.address[1])


# ---------------------------------------------------------------------------------------------
# coach gesfi inspect


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_inspect_cli(tmp_path, capsys, name):
    out = tmp_path / "img.png"
    rc = coach(["gesfi", "inspect", str(real(name)), "--image", str(out), "--scale", "6"])
    text = capsys.readouterr().out
    assert rc == 0
    fmt, packets, _, _ = EXPECTED[name]
    assert fmt in text and f"{packets} over" in text and "complex64" in text and "CSI ratio" in text
    img = cv2.imread(str(out))
    assert img is not None and img.shape[0] >= 32 * 6 and img.shape[1] >= 32 * 6
    assert img.std() > 5  # not a blank picture
    assert not list(tmp_path.glob(".inspect-*"))  # no temp file left behind


def test_inspect_cli_errors(tmp_path, capsys):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00\x01" * 100)
    assert coach(["gesfi", "inspect", str(junk)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "junk.bin" in err and "unknown CSI format" in err
    assert coach(["gesfi", "inspect", str(real("example_csi.csv")), "--image", str(tmp_path / "x.jpg")]) == 2
    assert not (tmp_path / "x.jpg").exists()
