"""The GesFi edge source (edge/gesfi/source.py): spec strings, files, directories, npz of simulated
receivers or images, channel replication, and a live UDP stream."""

from __future__ import annotations

import itertools
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from coach_runtime.errors import UserError
from edge.csi.synthetic import synthetic_csi
from edge.gesfi.preprocess import PreprocessConfig, doppler_image
from edge.gesfi.source import open_csi_source, parse_spec, span_s, window_starts
from edge.sample import Sample

SHARED = Path(__file__).resolve().parents[2] / "shared"
CSI_DIR = SHARED / "data" / "csi"
CFG = PreprocessConfig()


def real(name: str) -> Path:
    p = CSI_DIR / name
    if not p.exists():
        pytest.skip(f"shared CSI data not found at {p}")
    return p


def check_samples(samples: list[Sample], channels: int, name: str = "image") -> None:
    assert samples, "no samples"
    assert [s.id for s in samples] == list(range(len(samples)))
    for s in samples:
        x = s.inputs[name]
        assert x.shape == (1, channels, 32, 32) and x.dtype == np.float32
        assert np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1


def test_parse_spec():
    assert parse_spec("csi:/a/b.dat") == ("file", "/a/b.dat", {})
    assert parse_spec("csi:x.npz?channels=3&loop=1") == ("file", "x.npz", {"channels": "3", "loop": "1"})
    assert parse_spec("csi+udp://0.0.0.0:5500") == ("udp", ("0.0.0.0", 5500), {})
    assert parse_spec("csi+udp://[::1]:7000?idle_timeout=2")[1] == ("::1", 7000)
    for bad in ("file:/x", "csi:", "csi+udp://host", "csi+udp://host:99999", "csi+udp://:80"):
        with pytest.raises(UserError):
            parse_spec(bad)


def test_window_starts():
    assert window_starts(0.5, CFG) == [0.0]
    assert window_starts(2.0, CFG) == [0.0]
    assert window_starts(3.6, CFG) == [0.0, 0.5, 1.0, 1.5]


@pytest.mark.parametrize("name", ["sample_0x1_ap.dat", "ath_csi_1.dat", "example_csi.csv", "example.pcap",
                                  "rx_by_iwl5300.csi"])
def test_real_file_sources(name):
    p = real(name)
    from edge.csi import read_csi

    n_windows = len(window_starts(span_s(read_csi(p)), CFG))
    samples = list(itertools.islice(open_csi_source(f"csi:{p}?channels=3", "image", CFG), 6))
    check_samples(samples, 3)
    assert len(samples) == min(6, n_windows)
    assert [s.meta["t_start_s"] for s in samples] == [k * CFG.hop_s for k in range(len(samples))]
    s = samples[0]
    assert s.label is None and s.meta["channels_replicated"] and s.meta["file"] == str(p)
    np.testing.assert_array_equal(s.inputs["image"][0, 0], s.inputs["image"][0, 2])  # replicated
    one = next(iter(open_csi_source(f"csi:{p}", "x", CFG)))
    assert one.inputs["x"].shape == (1, 1, 32, 32)
    np.testing.assert_array_equal(one.inputs["x"][0, 0], s.inputs["image"][0, 0])


def test_directory_source(tmp_path):
    for name in ("ath_csi_1.dat", "example_csi.csv"):
        (tmp_path / name).write_bytes(real(name).read_bytes())
    (tmp_path / "notes.txt").write_text("not CSI")
    samples = list(open_csi_source(f"csi:{tmp_path}", "image", CFG, channels=3))
    check_samples(samples, 3)
    assert [Path(s.meta["file"]).name for s in samples] == ["ath_csi_1.dat", "example_csi.csv"]
    looped = open_csi_source(f"csi:{tmp_path}?loop=1", "image", CFG)
    assert len([next(looped) for _ in range(7)]) == 7  # a demo stream never runs dry


def test_npz_receivers_source(tmp_path):
    # three receivers of one 3 s recording, at 1 kHz: windows at 0, 0.5, 1.0 s
    rx = np.stack([synthetic_csi(3000, path_rate=r, seed=i) for i, r in enumerate((-1.0, 0.5, 1.5))])
    np.savez(tmp_path / "rec.npz", csi=rx, fs=1000.0)
    samples = list(open_csi_source(f"csi:{tmp_path / 'rec.npz'}", "image", CFG))
    check_samples(samples, 3)
    assert len(samples) == 3 and not samples[0].meta["channels_replicated"]
    # the source's image is exactly the preprocessing of the window (no train/serve skew)
    want = doppler_image([r[500:2500] for r in rx], CFG)
    np.testing.assert_array_equal(samples[1].inputs["image"][0], want)


def test_npz_raw_recordings_with_labels(tmp_path):
    # models/gesfi raw.npz layout: (N, C, T, S, R, Tx), labels alongside
    raw = np.stack([np.stack([synthetic_csi(2000, path_rate=r * (n + 1), seed=10 * n + c) for c, r in
                              enumerate((0.5, -0.5, 1.0))]) for n in range(2)])
    np.savez(tmp_path / "raw.npz", csi=raw, labels=np.array([4, 1]))
    samples = list(open_csi_source(f"csi:{tmp_path / 'raw.npz'}", "image", CFG))
    check_samples(samples, 3)
    assert [s.label for s in samples] == [4, 1]
    assert [s.meta["recording"] for s in samples] == [0, 1]


def test_npz_images_pass_through(tmp_path):
    X = np.random.default_rng(0).random((5, 3, 32, 32), dtype=np.float32)
    np.savez(tmp_path / "data.npz", X=X, y=np.arange(5))
    samples = list(open_csi_source(f"csi:{tmp_path / 'data.npz'}", "image", CFG))
    check_samples(samples, 3)
    assert [s.label for s in samples] == list(range(5))
    np.testing.assert_array_equal(samples[2].inputs["image"][0], X[2])
    np.savez(tmp_path / "small.npz", X=X[:, :, :16, :16])
    with pytest.raises(UserError, match="small.npz"):
        list(open_csi_source(f"csi:{tmp_path / 'small.npz'}", "image", CFG))


def test_errors_at_open(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        open_csi_source(f"csi:{tmp_path / 'nope.dat'}", "image", CFG)
    (tmp_path / "junk.dat").write_bytes(b"\x01\x02" * 64)
    with pytest.raises(UserError, match="junk.dat"):
        open_csi_source(f"csi:{tmp_path / 'junk.dat'}", "image", CFG)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no CSI files"):
        open_csi_source(f"csi:{tmp_path / 'empty'}", "image", CFG)
    with pytest.raises(UserError, match="channels"):
        open_csi_source(f"csi:{real('ath_csi_1.dat')}?channels=x", "image", CFG)
    with pytest.raises(UserError, match="idle_timeout"):
        open_csi_source("csi+udp://127.0.0.1:0?idle_timeout=soon", "image", CFG)
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(UserError, match="broken.npz"):
        open_csi_source(f"csi:{tmp_path / 'broken.npz'}", "image", CFG)
    np.savez(tmp_path / "nocsi.npz", other=np.zeros(3))
    with pytest.raises(UserError, match="nocsi.npz"):
        open_csi_source(f"csi:{tmp_path / 'nocsi.npz'}", "image", CFG)
    rx = np.stack([synthetic_csi(2000, seed=i) for i in range(2)])
    np.savez(tmp_path / "two.npz", csi=rx)
    with pytest.raises(UserError, match="2 receivers but the model wants 3"):
        list(open_csi_source(f"csi:{tmp_path / 'two.npz'}?channels=3", "image", CFG))


def test_udp_stream_source():
    # a free port, then a live stream of ESP32 lines: 3.2 s of packets at 1 kHz (ESP32 clock)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    src = open_csi_source(f"csi+udp://127.0.0.1:{port}?idle_timeout=1.0&channels=3", "image", CFG)
    x = synthetic_csi(3200, n_rx=1, n_sub=52, path_rate=1.0, seed=3)
    scale = 20.0 / np.abs(x).max()
    lines = []
    for i in range(x.shape[0]):
        re = np.round(x[i, :, 0, 0].real * scale).astype(int)
        im = np.round(x[i, :, 0, 0].imag * scale).astype(int)
        pairs = " ".join(f"{b} {a}" for a, b in zip(re, im))
        lines.append(f"CSI_DATA,STA,AA:BB:CC:DD:EE:FF,-50,11,1,0,1,1,1,0,0,0,0,-93,0,6,1,"
                     f"{1_000_000 + 1000 * i},0,101,0,0,0.0,384,[{pairs} ]")

    def send():
        time.sleep(0.2)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for k in range(0, len(lines), 20):  # 20 lines per datagram
                s.sendto(("\n".join(lines[k : k + 20]) + "\n").encode(), ("127.0.0.1", port))
                time.sleep(0.001)

    th = threading.Thread(target=send)
    th.start()
    samples = list(src)
    th.join()
    check_samples(samples, 3)
    # windows end at 2.0, 2.5, 3.0 s of stream time
    assert len(samples) == 3
    assert [round(s.meta["t_end_s"] - samples[0].meta["t_end_s"], 3) for s in samples] == [0.0, 0.5, 1.0]
    assert all(s.meta["format"] == "esp32-udp" for s in samples)
