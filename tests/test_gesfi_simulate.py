"""GesFi simulator: physics (Doppler from path-length change, NIC impairments), determinism,
the dataset on disk and `coach gesfi simulate`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from coach_runtime.cli import main
from coach_runtime.errors import UserError
from edge.gesfi.preprocess import PreprocessConfig, doppler_spectrogram
from models.gesfi.dataset import DatasetSpec, build_dataset, leave_one_out, load_dataset, save_dataset
from models.gesfi.simulate import (
    BLOCK_LOSS, GESTURES, ROOMS, SIM_VERSION, USERS, SimConfig, _blockage, antenna_positions, make_scene,
    path_length_rate, reflectors, simulate_csi, walker_channel, walker_positions,
)

PRE = PreprocessConfig()
IDEAL = SimConfig(wall_echoes=False, arm=False, torso=False, impairments=False, noise=False, blockage=False)


def _scene(gesture: int, seed: int = 1, location: int = 0, orientation: int = 2, room: int = 0, user: int = 0):
    return make_scene(gesture, location, orientation, room, user, np.random.default_rng(seed))


def test_csi_layout_and_determinism():
    cfg = SimConfig()
    sc = _scene(2)
    a = simulate_csi(sc, cfg, np.random.default_rng(7))
    b = simulate_csi(_scene(2), cfg, np.random.default_rng(7))
    c = simulate_csi(sc, cfg, np.random.default_rng(8))
    assert len(a) == 3
    for x in a:
        assert x.shape == (2000, 30, 3, 1) and x.dtype == np.complex64
        assert np.isfinite(x).all()
    assert all(np.array_equal(x, y) for x, y in zip(a, b))  # seeded: identical
    assert not np.array_equal(a[0], c[0])  # another seed: other noise and offsets


def test_impairments_are_common_to_a_nics_antennas():
    """CFO, timing offset and AGC gain hit every antenna of a NIC alike: the antenna ratio is unchanged."""
    sc = _scene(0)
    clean = simulate_csi(sc, SimConfig(noise=False, impairments=False), np.random.default_rng(3))
    dirty = simulate_csi(sc, SimConfig(noise=False, impairments=True), np.random.default_rng(3))
    for h0, h1 in zip(clean, dirty):
        assert not np.allclose(h0, h1)  # the raw CSI is scrambled per packet
        phase_jump = np.abs(np.angle(h1[1:, 0, 0, 0] / h1[:-1, 0, 0, 0]))
        assert np.median(phase_jump) > 0.5  # random per-packet phase
        r0 = h0[:, :, 1, 0] / h0[:, :, 0, 0]
        r1 = h1[:, :, 1, 0] / h1[:, :, 0, 0]
        # equal up to the fixed per-chain phase offset (one constant per receiver)
        rot = r1 / r0
        assert np.allclose(rot, rot[0, 0], atol=1e-3 * np.abs(rot[0, 0]))


def test_path_length_rate_matches_geometry():
    cfg = SimConfig()
    sc = _scene(0)
    pts, _, hand = reflectors(sc, cfg)
    h = pts[:, int(np.argmax(hand))]
    d = np.linalg.norm(h - sc.tx, axis=1) + np.linalg.norm(h - sc.rx[1], axis=1)
    rate = path_length_rate(sc, cfg)[1]
    assert np.allclose(np.gradient(d, 1 / cfg.fs), rate)
    assert np.abs(rate).max() > 0.5  # a push-pull moves the path by metres per second
    t = np.arange(cfg.n_packets) / cfg.fs
    still = (t < sc.t0 - 0.01) | (t > sc.t0 + sc.duration + 0.01)
    assert np.abs(rate[still]).max() < 1e-6  # the hand rests outside the gesture


def _tracking(cfg: SimConfig, gesture: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per receiver: (true Doppler per STFT frame, recovered peak Doppler per frame) on active frames."""
    sc = _scene(gesture, seed)
    rx = simulate_csi(sc, cfg, np.random.default_rng(seed + 100))
    f_d = -path_length_rate(sc, cfg) / cfg.wavelength  # f_D = -(1/lambda) d(path)/dt
    out = []
    for r in range(3):
        freqs, times, power = doppler_spectrogram(rx[r], PRE)
        centers = np.round(times * cfg.fs).astype(int)
        half = PRE.nperseg // 2
        true = np.array([f_d[r, max(0, c - half) : c + half].mean() for c in centers])
        peak = freqs[np.argmax(power, axis=0)]
        act = np.abs(true) > 10.0
        if act.sum() >= 4:
            out.append((true[act], peak[act]))
    return out


@pytest.mark.parametrize("cfg,tol_hz,min_sign", [(IDEAL, 6.0, 0.9), (SimConfig(body_motion=False), 10.0, 0.8)],
                         ids=["hand-only", "full-physics"])
def test_preprocessing_doppler_tracks_path_length_rate(cfg, tol_hz, min_sign):
    """The edge preprocessing recovers f_D = -(1/lambda) d(path length)/dt from simulated CSI, with its sign.

    Full physics without the users' upper-body lean: a leaning torso (the largest reflector) puts the
    strongest power at a tenth of the hand's Doppler, so the spectrum's peak is then the torso, not
    the hand (median error 13 Hz instead of 4 Hz on these scenes), by design of the simulator.
    """
    pairs = [p for g, s in [(0, 1), (1, 2), (4, 3), (5, 4)] for p in _tracking(cfg, g, s)]
    assert len(pairs) >= 4
    true = np.concatenate([t for t, _ in pairs])
    peak = np.concatenate([p for _, p in pairs])
    assert np.median(np.abs(peak - true)) < tol_hz
    assert np.mean(np.sign(peak) == np.sign(true)) >= min_sign
    assert np.corrcoef(true, peak)[0, 1] > 0.8


@pytest.mark.parametrize("cfg", [IDEAL, SimConfig()], ids=["hand-only", "full-physics"])
def test_preprocessing_keeps_the_doppler_sign(cfg):
    """On active frames, the side of the spectrum with f_D's sign holds most of the power.

    A ratio that is amplitude-modulated by the moving path (e.g. a per-packet gain normalisation
    over only 20 MHz of subcarriers) mirrors the Doppler: both sides then hold about the same power.
    """
    margins = []
    for g, seed in [(0, 1), (1, 2), (3, 3), (4, 4), (5, 5)]:
        sc = _scene(g, seed)
        rx = simulate_csi(sc, cfg, np.random.default_rng(seed + 100))
        f_d = -path_length_rate(sc, cfg) / cfg.wavelength
        for r in range(3):
            freqs, times, power = doppler_spectrogram(rx[r], PRE)
            centers = np.round(times * cfg.fs).astype(int)
            true = np.array([f_d[r, max(0, c - 128) : c + 128].mean() for c in centers])
            act = np.abs(true) > 10.0
            if act.sum() < 3:
                continue
            side = np.sign(freqs)[:, None] * np.sign(true[act])[None, :]
            right = (power[:, act] * (side > 0)).sum()
            wrong = (power[:, act] * (side < 0)).sum()
            margins.append(10 * np.log10(right / wrong))
    assert len(margins) >= 5
    assert np.median(margins) > 6.0, f"Doppler sign lost: right-vs-mirror power margins {np.round(margins, 1)} dB"


def test_domains_change_the_doppler_signature():
    """The same gesture seen from another orientation or location moves the Doppler to other receivers."""
    cfg = SimConfig()
    base = np.abs(path_length_rate(_scene(0, orientation=2), cfg)).max(axis=1)
    turned = np.abs(path_length_rate(_scene(0, orientation=0), cfg)).max(axis=1)
    moved = np.abs(path_length_rate(_scene(0, location=4), cfg)).max(axis=1)
    assert np.abs(base - turned).max() > 0.3
    assert np.abs(base - moved).max() > 0.1


def test_body_blocks_the_paths_behind_it():
    """A segment through the torso loses BLOCK_LOSS; one in front of the body, or from inside it, none."""
    body = np.array([2.0, 2.0])
    hand = np.array([[[2.4, 2.0, 1.1]]])  # 0.4 m in front (+x) of the body
    rx = np.array([[[[1.0, 2.0, 1.0], [3.5, 2.0, 1.0], [2.4, 0.5, 1.0]]]])  # behind, ahead, to the side
    att = _blockage(hand, rx, body)[0, 0]
    assert att[0] == pytest.approx(BLOCK_LOSS) and att[1] == 1.0 and att[2] == 1.0
    inside = _blockage(np.array([[[2.05, 2.0, 1.1]]]), rx, body)[0, 0]
    assert np.all(inside == 1.0)
    # in a scene: turning the user around moves the shadow to other receivers, and switching it off
    # leaves the hand's path amplitudes untouched
    cfg = SimConfig()
    shadowed = []
    for o in range(5):
        sc = _scene(0, orientation=o)
        pts, _, hand_mask = reflectors(sc, cfg)
        b = _blockage(pts[:, hand_mask], sc.rx[None, None], sc.body)[:, 0]  # (T, R)
        shadowed.append(tuple((b < 0.9).mean(0) > 0.5))
    assert len(set(shadowed)) >= 2 and any(any(s) for s in shadowed)


def test_users_lean_into_the_gesture():
    """The torso follows the hand by the user's lean (~0.1 s late); no lean with body_motion off."""
    cfg = SimConfig()
    u = max(range(len(USERS)), key=lambda i: USERS[i].lean)
    sc = make_scene(0, 0, 2, 0, u, np.random.default_rng(2))  # push-pull: 0.35 m forward and back
    pts, _, _ = reflectors(sc, cfg)
    off, _, _ = reflectors(sc, SimConfig(body_motion=False))
    torso_move = np.linalg.norm(pts[:, -1] - off[:, -1], axis=1)
    hand_move = np.linalg.norm(pts[:, 0] - pts[0, 0], axis=1)
    assert torso_move.max() == pytest.approx(USERS[u].lean * hand_move.max(), rel=0.05)
    lag = np.argmax(torso_move) - np.argmax(hand_move)
    assert 50 <= lag <= 150  # packets at 1 kHz
    assert np.allclose(pts[:, 0], off[:, 0])  # the hand itself is unchanged


def test_walkers_stay_in_the_room_and_add_doppler():
    cfg = SimConfig(walkers=True)
    hall = next(i for i, r in enumerate(ROOMS) if r.walkers >= 2)
    scenes = [make_scene(1, 0, 2, hall, 0, np.random.default_rng(s), cfg) for s in range(8)]
    n = [len(sc.extra["walkers"]) for sc in scenes]
    assert min(n) >= 0 and max(n) >= 1 and max(n) <= ROOMS[hall].walkers
    sc = scenes[int(np.argmax(n))]
    p = walker_positions(sc, cfg)
    size = np.array(sc.room.size[:2])
    assert p.shape == (cfg.n_packets, max(n), 3) and np.all(p[..., :2] >= 0.3 - 1e-9)
    assert np.all(p[..., :2] <= size - 0.3 + 1e-9)
    speed = np.linalg.norm(np.diff(p, axis=0), axis=-1) * cfg.fs
    assert np.all(speed < 1.25)  # walking pace, also across the turns at the walls
    h = walker_channel(sc, antenna_positions(sc, cfg), cfg)
    assert h.shape == (cfg.n_packets, 3, 3, 30) and np.abs(h).std(axis=0).max() > 0
    # no walkers by default, none in a room without them
    assert len(make_scene(1, 0, 2, hall, 0, np.random.default_rng(0)).extra["walkers"]) == 0
    office = next(i for i, r in enumerate(ROOMS) if r.walkers == 0)
    assert len(make_scene(1, 0, 2, office, 0, np.random.default_rng(0), cfg).extra["walkers"]) == 0


def test_every_gesture_moves_the_hand():
    cfg = SimConfig()
    for g in range(len(GESTURES)):
        rate = path_length_rate(_scene(g), cfg)
        assert np.abs(rate).max() > 0.3, GESTURES[g]


def test_dataset_round_trip_and_splits(tmp_path):
    spec = DatasetSpec(locations=(0,), orientations=(1, 3), rooms=(0,), users=(0, 1), gestures=(0, 3), reps=1, raw=1)
    data, raw = build_dataset(spec)
    assert data.x.shape == (8, 3, 32, 32) and data.x.dtype == np.float32
    assert np.isfinite(data.x).all() and data.x.min() >= 0 and data.x.max() <= 1
    assert raw.shape == (1, 3, 2000, 30, 3, 1)
    again, _ = build_dataset(spec, workers=2)  # per-sample seeds: the same data with 2 processes
    assert np.array_equal(data.x, again.x)
    save_dataset(data, tmp_path / "ds", raw)
    back = load_dataset(tmp_path / "ds")
    assert np.array_equal(back.x, data.x) and np.array_equal(back.y, data.y)
    assert set(back.manifest["files"]) == {"data.npz", "raw.npz"}
    tr, te = leave_one_out(back, "orientation", 3)
    assert set(back.domains["orientation"][te]) == {3} and set(back.domains["orientation"][tr]) == {1}
    with pytest.raises(UserError):
        leave_one_out(back, "orientation", 0)


def test_load_dataset_errors(tmp_path):
    with pytest.raises(UserError, match="manifest.json"):
        load_dataset(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_dataset(tmp_path / "bad")


def test_simulate_cli(tmp_path, capsys):
    out = tmp_path / "sim"
    argv = ["gesfi", "simulate", "--out", str(out), "--locations", "0", "--orientations", "2", "--rooms", "1",
            "--users", "0", "--raw", "0"]
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["n"] == 6 and manifest["image_shape"] == [3, 32, 32]
    assert manifest["simulator_version"] == SIM_VERSION and manifest["simulator"]["walkers"] is False
    assert manifest["counts"]["room"] == [0, 6, 0]
    assert not (out / "raw.npz").exists()
    with np.load(out / "data.npz", allow_pickle=False) as z:
        assert set(z.files) == {"X", "y", "location", "orientation", "room", "user"}
    capsys.readouterr()
    assert main(argv) == 2  # exists: a one-line error, nothing overwritten
    err = capsys.readouterr().err
    assert "exists" in err and len(err.strip().splitlines()) == 1
    assert main(["gesfi", "simulate", "--out", str(tmp_path / "x"), "--rooms", "7"]) == 2
    assert not (tmp_path / "x").exists()
