"""Physically based CSI simulator for the six Widar3.0 gestures (numpy only).

A transmitter and three receivers (one NIC each: 3 receive antennas, 1 transmit antenna, 30
subcarriers of a 20 MHz channel at 5.825 GHz, 1000 packets/s) stand in a room. The channel seen by
antenna a of receiver r on subcarrier k at packet t is a sum of propagation paths

    H[t, k, r, a] = sum_p  amp_p(t) * exp(-j 2 pi (fc + k df) d_p(t, r, a) / c)

- static paths: line of sight, first-order images in the four walls, the floor and the ceiling
  (reflection coefficient of the room) and the room's furniture (point scatterers);
- moving paths: the hand (two hands for clap) moving along the gesture trajectory, the forearm
  (half-way between shoulder and hand, the elbow held out by a per-user amount), the torso swaying a
  little and leaning into the gesture (each user follows the hand with the upper body by a
  per-user fraction, ~0.1 s late: the torso is the largest reflector, so a small lean is a strong,
  slow Doppler component that differs between users); the hand is also seen through first-order
  echoes in the four walls (Tx -> wall -> hand -> Rx), so the room shapes the signature;
- body blockage: a path from the hand or forearm that passes through the user's torso (a vertical
  cylinder of radius 0.2 m) loses ~12 dB (5 GHz through a body, softened over 5 cm by
  diffraction), so which links see the hand depends on where the user stands and faces;
- other people (SimConfig.walkers, off by default: datasets such as Widar3.0 are collected with
  nobody else about): each room has a number of people walking about outside the sensing area
  (0.4-1.2 m/s, each present in a given recording with probability 0.6), an interference with
  Doppler up to ~45 Hz that the preprocessing cannot remove (summed exactly, no small-motion
  expansion). With them on, in-domain accuracy falls to ~87% for every method.
A moving path of length d(t) shows up with Doppler f_D = -(1/lambda) dd/dt, lambda = c / fc.

Each receiver is its own NIC: per-packet common phase offset (CFO), timing offset (a phase slope
over subcarriers), AGC gain jitter, all shared by its antennas (the CSI ratio cancels them), and
white noise at the room's SNR.

Domains (the factors a deployment changes): location of the user (5), facing orientation (5),
room (3: size, walls, furniture, device placement, noise) and user (5: speed, scale and style:
tilt of the gesture plane, velocity profile, hand height, hand size, how much the upper body
follows the hand, how far the elbow is held out). Everything is seeded and deterministic:
`make_scene(..., rng)` and `simulate_csi(scene, cfg, rng)`.

SIM_VERSION is recorded in every dataset manifest; it changes whenever the simulator's output does.
Version 1: static multipath, hand/forearm/torso sway, wall echoes of the hand, NIC impairments.
Version 2: + per-user upper-body lean and elbow style, body blockage, walkers in the room.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SIM_VERSION = "2"
C_LIGHT = 299_792_458.0
# Intel 5300 reports 30 of the 56 subcarriers of a 20 MHz channel (grouping Ng=2).
INTEL5300_SUBCARRIERS = tuple(list(range(-28, -1, 2)) + [-1, 1] + list(range(3, 28, 2)) + [28])

GESTURES = ("push-pull", "sweep", "clap", "slide", "draw-o", "draw-zigzag")
FACTORS = ("location", "orientation", "room", "user")


@dataclass(frozen=True)
class SimConfig:
    fc: float = 5.825e9  # carrier (Hz), channel 165 as in Widar3.0
    subcarrier_spacing: float = 312.5e3
    subcarriers: tuple[int, ...] = INTEL5300_SUBCARRIERS
    fs: float = 1000.0  # packets per second
    duration_s: float = 2.0
    n_rx_ant: int = 3
    # physics switches (all on for datasets; tests turn some off to check one effect at a time)
    wall_echoes: bool = True
    arm: bool = True
    torso: bool = True
    impairments: bool = True  # per-packet phase/timing offsets and gain jitter
    noise: bool = True
    body_motion: bool = True  # per-user lean of the upper body and elbow style
    blockage: bool = True  # the torso shadows the hand's paths behind it
    walkers: bool = False  # other people walking about in the room (off: a controlled collection)

    @property
    def wavelength(self) -> float:
        return C_LIGHT / self.fc

    @property
    def n_packets(self) -> int:
        return int(round(self.fs * self.duration_s))


# ---------------------------------------------------------------------------------------------
# Domain tables


@dataclass(frozen=True)
class Room:
    name: str
    size: tuple[float, float, float]  # (Lx, Ly, Lz) metres, walls at 0 and L
    center: tuple[float, float]  # centre of the sensing area
    gamma: float  # wall reflection coefficient (amplitude)
    n_scatterers: int  # furniture
    snr_db: float  # per-element SNR relative to the static channel power
    layout_scale: float  # device distance from the centre, relative to the standard 1.3 m
    layout_rot_deg: float  # deployment rotated about the centre
    seed: int  # places the furniture and the antenna array axes
    walkers: int = 0  # people walking about outside the sensing area (interference)


# The deployment is the standard one in every room, give or take a few centimetres and degrees;
# rooms differ by their multipath (walls, furniture, echoes of the hand) and noise.
ROOMS = (
    Room("classroom", (8.0, 6.5, 3.2), (3.6, 3.0), 0.45, 14, 30.0, 1.00, 0.0, 11, walkers=1),
    Room("hall", (14.0, 11.0, 4.5), (6.0, 5.0), 0.30, 6, 33.0, 1.04, 4.0, 22, walkers=2),
    Room("office", (4.6, 4.2, 2.8), (2.3, 2.1), 0.60, 20, 27.0, 0.96, -3.0, 33, walkers=0),
)

# Standard deployment relative to the sensing-area centre (x, y, z): Tx in one corner, three
# receivers around the area (as Widar3.0 does with six).
TX_LAYOUT = (-1.3, -1.3, 1.0)
RX_LAYOUT = ((1.3, -1.3, 1.0), (-1.3, 1.3, 1.0), (0.3, 1.5, 1.0))

# User locations (offsets from the centre of the sensing area) and facing directions.
LOCATIONS = ((0.0, 0.0), (-0.5, -0.5), (0.5, -0.5), (-0.5, 0.5), (0.5, 0.5))
ORIENTATIONS_DEG = (-90.0, -45.0, 0.0, 45.0, 90.0)


@dataclass(frozen=True)
class User:
    name: str
    speed: float  # > 1: faster gestures
    scale: float  # > 1: larger gestures
    tilt_deg: float  # gesture plane rotated about the vertical (style)
    skew: float  # velocity-profile warp exponent: < 1 fast start, > 1 slow start (style)
    hand_height: float  # metres above the floor
    hand_size: float  # relative radar cross-section of the hand
    lean: float = 0.0  # fraction of the hand's displacement the upper body follows (style)
    elbow_out: float = 0.0  # metres the elbow is held out from the body (style)


USERS = (
    User("u1", 1.00, 1.00, 0.0, 1.00, 1.10, 1.0, lean=0.10, elbow_out=0.04),
    User("u2", 1.25, 0.85, 12.0, 0.80, 1.05, 0.8, lean=0.25, elbow_out=0.10),
    User("u3", 0.82, 1.20, -10.0, 1.25, 1.20, 1.2, lean=0.04, elbow_out=0.00),
    User("u4", 1.10, 1.10, 5.0, 1.10, 1.00, 0.9, lean=0.18, elbow_out=0.06),
    User("u5", 0.92, 0.82, -15.0, 0.90, 1.15, 1.1, lean=0.02, elbow_out=0.12),
)

DOMAIN_VALUES = {
    "location": [f"loc{i}" for i in range(len(LOCATIONS))],
    "orientation": [f"{int(a):+d}deg" for a in ORIENTATIONS_DEG],
    "room": [r.name for r in ROOMS],
    "user": [u.name for u in USERS],
}

# Nominal gesture durations (s) at speed 1.
DURATION_S = {
    "push-pull": 1.0,
    "sweep": 0.9,
    "clap": 0.8,
    "slide": 0.7,
    "draw-o": 1.2,
    "draw-zigzag": 1.4,
}


# ---------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class Scene:
    """One gesture performance, fully concrete (positions in metres, room frame)."""

    gesture: int
    domain: dict  # factor -> index into the domain tables
    room: Room
    tx: np.ndarray  # (3,)
    rx: np.ndarray  # (R, 3) receiver centres
    rx_axis: np.ndarray  # (R, 3) unit vectors along each receiver's antenna array
    scatterers: np.ndarray  # (P, 3)
    scatterer_rcs: np.ndarray  # (P,)
    body: np.ndarray  # (2,) user position (x, y)
    facing_rad: float
    user: User
    speed: float  # effective speed (user speed x per-sample jitter)
    scale: float
    t0: float  # gesture start within the window (s)
    duration: float  # gesture duration (s)
    sway_phase: float = 0.0
    extra: dict = field(default_factory=dict)


def _rot2(v: np.ndarray, deg: float) -> np.ndarray:
    """Rotate v (3, ...) about the vertical axis by deg."""
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    return np.stack([c * v[0] - s * v[1], s * v[0] + c * v[1], *v[2:]])


def room_devices(room: Room) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Tx, Rx centres, Rx array axes and the furniture of a room (fixed per room)."""
    rng = np.random.default_rng(room.seed)
    center = np.array([room.center[0], room.center[1], 0.0])
    tx = center + _rot2(np.array(TX_LAYOUT) * [room.layout_scale, room.layout_scale, 1], room.layout_rot_deg)
    rx = np.stack(
        [center + _rot2(np.array(p) * [room.layout_scale, room.layout_scale, 1], room.layout_rot_deg) for p in RX_LAYOUT]
    )
    # antenna arrays broadside to the transmitter (the standard deployment), +-10 degrees per room
    to_tx = tx[None, :2] - rx[:, :2]
    angles = np.arctan2(to_tx[:, 1], to_tx[:, 0]) + np.pi / 2 + np.deg2rad(rng.uniform(-10, 10, size=len(rx)))
    axis = np.stack([np.cos(angles), np.sin(angles), np.zeros_like(angles)], axis=1)
    lo, hi = np.array([0.2, 0.2, 0.2]), np.array(room.size) - 0.2
    pts = []
    while len(pts) < room.n_scatterers:  # furniture outside the sensing area
        p = rng.uniform(lo, hi)
        if np.max(np.abs(p[:2] - center[:2])) > 1.0:
            pts.append(p)
    scat = np.array(pts).reshape(-1, 3)
    rcs = rng.uniform(0.1, 0.6, size=len(scat))
    return tx, rx, axis, scat, rcs


def make_scene(
    gesture: int, location: int, orientation: int, room: int, user: int, rng: np.random.Generator,
    cfg: SimConfig = SimConfig(),
) -> Scene:
    """Concrete scene for one (gesture, domain) draw, with per-performance jitter from `rng`."""
    rm, us = ROOMS[room], USERS[user]
    tx, rx, axis, scat, rcs = room_devices(rm)
    loc = np.array(LOCATIONS[location]) + rng.normal(0, 0.05, size=2)
    body = np.array(rm.center) + loc
    facing = np.deg2rad(ORIENTATIONS_DEG[orientation] + rng.normal(0, 5.0))
    speed = us.speed * float(np.exp(rng.normal(0, 0.06)))
    scale = us.scale * float(np.exp(rng.normal(0, 0.06)))
    name = GESTURES[gesture]
    duration = min(DURATION_S[name] / speed, cfg.duration_s - 0.25)  # the gesture fits the window
    t0 = float(rng.uniform(0.1, max(0.1, cfg.duration_s - duration - 0.1)))
    sway_phase = float(rng.uniform(0, 2 * np.pi))
    extra = {"walkers": _draw_walkers(rm, rng) if cfg.walkers else np.zeros((0, 2, 3))}
    return Scene(
        gesture=gesture,
        domain={"location": location, "orientation": orientation, "room": room, "user": user},
        room=rm, tx=tx, rx=rx, rx_axis=axis, scatterers=scat, scatterer_rcs=rcs,
        body=body, facing_rad=float(facing), user=us, speed=speed, scale=scale,
        t0=t0, duration=duration, sway_phase=sway_phase, extra=extra,
    )


WALKER_PRESENT = 0.6  # probability that each of a room's walkers is about during a recording
WALKER_RCS = 0.5  # a whole person
WALKER_HEIGHT = 1.1  # centre of the torso (m)


def _draw_walkers(room: Room, rng: np.random.Generator) -> np.ndarray:
    """(M, 2, 3): start point and velocity of each walker present, >= 1.5 m from the area's centre."""
    out = []
    lo, hi = np.array([0.3, 0.3]), np.array(room.size[:2]) - 0.3
    for _ in range(room.walkers):
        present = rng.random() < WALKER_PRESENT
        for _ in range(100):  # rejection sampling: outside the sensing area
            p = rng.uniform(lo, hi)
            if np.linalg.norm(p - np.array(room.center)) > 1.5:
                break
        heading = rng.uniform(0, 2 * np.pi)
        speed = rng.uniform(0.4, 1.2)
        if present:
            out.append([[p[0], p[1], WALKER_HEIGHT], [speed * np.cos(heading), speed * np.sin(heading), 0.0]])
    return np.array(out, float).reshape(-1, 2, 3)


def walker_positions(scene: Scene, cfg: SimConfig) -> np.ndarray:
    """(T, M, 3): walkers go straight and turn back at 0.3 m from the walls (folded trajectory)."""
    w = scene.extra.get("walkers", np.zeros((0, 2, 3)))
    t = scene_time(cfg)
    p = w[None, :, 0, :] + t[:, None, None] * w[None, :, 1, :]  # (T, M, 3)
    for ax in range(2):
        lo, hi = 0.3, scene.room.size[ax] - 0.3
        span = hi - lo
        u = np.mod(p[..., ax] - lo, 2 * span)
        p[..., ax] = lo + np.where(u > span, 2 * span - u, u)
    return p


# ---------------------------------------------------------------------------------------------
# Gesture trajectories (local body frame: F forward, L left, U up; metres)


def _min_jerk(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x**3 * (10 - 15 * x + 6 * x**2)


def _strokes(s: np.ndarray, waypoints: np.ndarray) -> np.ndarray:
    """Piecewise straight strokes through waypoints (n+1, D), min-jerk within each, s in [0, 1]."""
    n = len(waypoints) - 1
    seg = np.clip(s, 0, 1) * n
    i = np.minimum(seg.astype(int), n - 1)
    frac = _min_jerk(seg - i)
    return waypoints[i] + (waypoints[i + 1] - waypoints[i]) * frac[:, None]


def gesture_hands(name: str, s: np.ndarray) -> list[np.ndarray]:
    """Hand displacement(s) in the local frame, each (T, 3) (F, L, U), for progress s in [0, 1].

    Displacements are relative to the hand's rest point in front of the right shoulder (clap: each
    hand relative to its own rest point). Sizes are at user scale 1.
    """
    z = np.zeros_like(s)
    if name == "push-pull":  # forward and back along the facing direction
        return [_strokes(s, np.array([[0, 0, 0], [0.35, 0, 0], [0, 0, 0]], float))]
    if name == "sweep":  # one arc from left to right about the shoulder, radius 0.45 m
        phi = np.deg2rad(40.0) - np.deg2rad(80.0) * _min_jerk(s)
        r = 0.45
        f = r * np.cos(phi) - r * np.cos(np.deg2rad(40.0))
        lat = r * np.sin(phi)
        return [np.stack([f, lat, z], axis=1)]
    if name == "clap":  # both hands in to meet, then out again
        right = _strokes(s, np.array([[0, 0, 0], [0, 0.23, 0], [0, 0, 0]], float))
        left = right * np.array([1, -1, 1])
        return [right, left]
    if name == "slide":  # one straight stroke from right to left
        return [_strokes(s, np.array([[0, -0.2, 0], [0, 0.22, 0]], float))]
    if name == "draw-o":  # a horizontal circle of radius 0.15 m, one loop
        a = 2 * np.pi * _min_jerk(s)
        r = 0.15
        return [np.stack([r * np.sin(a), r * (1 - np.cos(a)), z], axis=1)]
    if name == "draw-zigzag":  # a horizontal Z: right-left stroke, diagonal, right-left stroke
        w = np.array([[0, 0.15, 0], [0, -0.15, 0], [0.15, 0.15, 0], [0.15, -0.15, 0]], float)
        return [_strokes(s, w)]
    raise ValueError(f"unknown gesture {name!r}; one of {GESTURES}")


# Rest points in the local frame (F, L, U-offset from hand height).
_SHOULDER_R = np.array([0.0, -0.2, 0.25])
_REST_R = np.array([0.3, -0.15, 0.0])
_CLAP_REST = (np.array([0.35, -0.26, 0.0]), np.array([0.35, 0.26, 0.0]))


def scene_time(cfg: SimConfig) -> np.ndarray:
    return np.arange(cfg.n_packets) / cfg.fs


def reflectors(scene: Scene, cfg: SimConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Moving reflectors in the room frame.

    Returns positions (T, Q, 3), radar cross-sections (Q,), and a mask (Q,) marking the hands.
    """
    t = scene_time(cfg)
    name = GESTURES[scene.gesture]
    us = scene.user
    s = np.clip((t - scene.t0) / scene.duration, 0.0, 1.0) ** us.skew
    moves = gesture_hands(name, s)
    rests = list(_CLAP_REST) if name == "clap" else [_REST_R]
    fwd = np.array([np.cos(scene.facing_rad), np.sin(scene.facing_rad), 0.0])
    left = np.array([-np.sin(scene.facing_rad), np.cos(scene.facing_rad), 0.0])
    up = np.array([0.0, 0.0, 1.0])
    base = np.array([scene.body[0], scene.body[1], us.hand_height])

    def to_room(local: np.ndarray) -> np.ndarray:  # (..., 3) local -> room frame
        return base + local[..., :1] * fwd + local[..., 1:2] * left + local[..., 2:3] * up

    pts, rcs, hand = [], [], []
    disp = []
    for i, (move, rest) in enumerate(zip(moves, rests)):
        tilt = us.tilt_deg if i == 0 else -us.tilt_deg  # the second clap hand mirrors the style
        d = _rot2(move.T * scene.scale, tilt).T
        disp.append(d)
        hand_local = rest + d
        pts.append(to_room(hand_local))
        rcs.append(0.12 * us.hand_size)
        hand.append(True)
        if cfg.arm:  # forearm: half-way between shoulder and hand, the elbow held out sideways
            side = -1.0 if rest[1] > 0 else 1.0  # +1: right arm (out = -L), -1: left arm
            sh = _SHOULDER_R * (np.array([1, -1, 1]) if rest[1] > 0 else 1)
            elbow = np.array([0.0, -side * us.elbow_out, 0.0]) if cfg.body_motion else 0.0
            pts.append(to_room(0.5 * (sh + hand_local) + elbow))
            rcs.append(0.06 * us.hand_size)
            hand.append(False)
    if cfg.torso:  # torso: a large reflector swaying by ~1 cm, leaning into the gesture
        sway = 0.01 * np.sin(2 * np.pi * 0.3 * t + scene.sway_phase)
        torso_local = np.stack([sway, np.zeros_like(t), np.full_like(t, 0.2)], axis=1)
        if cfg.body_motion and us.lean > 0:
            lag = int(round(0.1 * cfg.fs))  # the body follows the hand ~0.1 s late
            mean_disp = np.mean(disp, axis=0)  # (T, 3); the two clap hands' sideways parts cancel
            lagged = np.concatenate([np.repeat(mean_disp[:1], lag, axis=0), mean_disp[: len(t) - lag]])
            torso_local = torso_local + us.lean * lagged * np.array([1.0, 1.0, 0.0])
        pts.append(to_room(torso_local))
        rcs.append(0.3)
        hand.append(False)
    return np.stack(pts, axis=1), np.array(rcs), np.array(hand)


# ---------------------------------------------------------------------------------------------
# Propagation


def antenna_positions(scene: Scene, cfg: SimConfig) -> np.ndarray:
    """(R, A, 3) antenna positions: a half-wavelength linear array per receiver."""
    offs = (np.arange(cfg.n_rx_ant) - (cfg.n_rx_ant - 1) / 2) * cfg.wavelength / 2
    return scene.rx[:, None, :] + offs[None, :, None] * scene.rx_axis[:, None, :]


def _wall_images(p: np.ndarray, size: tuple[float, float, float], walls: str = "xy") -> np.ndarray:
    """Mirror images of points p (..., 3) in the room's walls (x=0, x=Lx, y=0, y=Ly [, floor, ceiling])."""
    out = []
    for axis in range(3 if walls == "xyz" else 2):
        for wall in (0.0, size[axis]):
            q = p.copy()
            q[..., axis] = 2 * wall - q[..., axis]
            out.append(q)
    return np.stack(out, axis=-2)


def static_paths(scene: Scene, ants: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Static path lengths (R, A, P) and amplitudes (R, A, P): LoS, 6 wall images, furniture."""
    tx = scene.tx
    imgs = _wall_images(tx, scene.room.size, "xyz")  # (6, 3)
    srcs = np.concatenate([tx[None], imgs])  # (7, 3)
    d_direct = np.linalg.norm(ants[:, :, None, :] - srcs[None, None], axis=-1)  # (R, A, 7)
    gains = np.array([1.0] + [scene.room.gamma] * 4 + [0.8 * scene.room.gamma] * 2)
    a_direct = gains / d_direct
    d1 = np.linalg.norm(scene.scatterers - tx, axis=-1)  # (P,)
    d2 = np.linalg.norm(ants[:, :, None, :] - scene.scatterers[None, None], axis=-1)  # (R, A, P)
    d_scat = d1 + d2
    a_scat = scene.scatterer_rcs / (d1 * d2)
    return np.concatenate([d_direct, d_scat], axis=-1), np.concatenate([a_direct, a_scat], axis=-1)


def moving_paths(scene: Scene, ants: np.ndarray, cfg: SimConfig) -> tuple[np.ndarray, np.ndarray]:
    """Moving path lengths (T, Q', R, A) and amplitudes (T, Q', R, A) (hands, arm, torso, echoes)."""
    pts, rcs, hand = reflectors(scene, cfg)  # (T, Q, 3)
    srcs = [scene.tx[None, None, :]]
    gains = [1.0]
    if cfg.wall_echoes:  # Tx -> wall -> reflector -> Rx, the four walls
        imgs = _wall_images(scene.tx, scene.room.size, "xy")
        srcs += [im[None, None, :] for im in imgs]
        gains += [scene.room.gamma] * len(imgs)
    d2 = np.linalg.norm(pts[:, :, None, None, :] - ants[None, None], axis=-1)  # (T, Q, R, A)
    n_body = len(hand) - (1 if cfg.torso else 0)  # hands and forearms (the torso is last)
    blocked_rx = np.ones((len(pts), len(hand), len(scene.rx)), np.float64)  # (T, Q, R)
    if cfg.blockage:
        blocked_rx[:, :n_body] = _blockage(pts[:, :n_body], scene.rx[None, None], scene.body)
    lens, amps = [], []
    for k, (src, g) in enumerate(zip(srcs, gains)):
        sel = slice(None) if k == 0 else hand  # echoes only for the hands
        d1 = np.linalg.norm(pts[:, sel] - src, axis=-1)  # (T, q)
        att = blocked_rx[:, sel][..., None]  # (T, q, R, 1)
        if cfg.blockage:
            tx_leg = np.ones(d1.shape)
            body_sel = np.arange(len(hand))[sel] < n_body
            tx_leg[:, body_sel] = _blockage(pts[:, sel][:, body_sel], src.reshape(1, 1, 1, 3), scene.body)[..., 0]
            att = att * tx_leg[..., None, None]
        lens.append(d1[..., None, None] + d2[:, sel])
        amps.append(att * g * rcs[sel][None, :, None, None] / (d1[..., None, None] * d2[:, sel]))
    return np.concatenate(lens, axis=1), np.concatenate(amps, axis=1)


BODY_RADIUS = 0.2  # m, the torso as a vertical cylinder
BLOCK_LOSS = 10 ** (-12 / 20)  # amplitude through the body (~12 dB at 5 GHz)
BLOCK_SOFT = 0.05  # m, diffraction softens the shadow's edge


def _blockage(p: np.ndarray, q: np.ndarray, body: np.ndarray) -> np.ndarray:
    """Amplitude factor of the segments from reflectors p (T, Q, 3) to endpoints q (1, 1, R, 3).

    Works in the horizontal plane (hands, devices and torso are all about 1 m high). Returns
    (T, Q, R): 1 in the clear, BLOCK_LOSS when the segment passes through the torso, a linear ramp
    over +-BLOCK_SOFT around its edge. A reflector inside the cylinder is not shadowed by it.
    """
    a = p[..., None, :2]  # (T, Q, 1, 2)
    b = q[..., :2]  # (.., .., R, 2)
    c = np.asarray(body, float)[:2]
    ab = b - a
    t = np.clip(np.sum((c - a) * ab, axis=-1) / np.maximum(np.sum(ab * ab, axis=-1), 1e-12), 0.0, 1.0)
    dist = np.linalg.norm(a + t[..., None] * ab - c, axis=-1)
    depth = np.clip((BODY_RADIUS + BLOCK_SOFT - dist) / (2 * BLOCK_SOFT), 0.0, 1.0)
    start_in = np.linalg.norm(a[..., 0, :] - c, axis=-1)[..., None] < BODY_RADIUS
    depth = np.where(start_in, 0.0, depth)
    return 1.0 - (1.0 - BLOCK_LOSS) * depth


def path_length_rate(scene: Scene, cfg: SimConfig = SimConfig()) -> np.ndarray:
    """d/dt of the direct Tx -> hand -> Rx path length, (R, T) m/s (first hand, middle antenna)."""
    pts, _, hand = reflectors(scene, cfg)
    h = pts[:, int(np.argmax(hand))]  # (T, 3)
    d = np.linalg.norm(h - scene.tx, axis=-1)[None] + np.linalg.norm(h[None] - scene.rx[:, None], axis=-1)
    return np.gradient(d, 1.0 / cfg.fs, axis=1)


def _phasor_sum(lengths: np.ndarray, amps: np.ndarray, cfg: SimConfig) -> np.ndarray:
    """Exact sum_p amp_p exp(-j 2 pi f_k d_p / c) over the last (path) axis, per subcarrier.

    lengths/amps (..., P) -> complex64 (..., S). Carrier cycles are reduced mod 1 in float64 so the
    float32 trigonometry that follows keeps its precision (d / lambda is ~100 cycles).
    """
    cyc = np.mod(lengths * (cfg.fc / C_LIGHT), 1.0).astype(np.float32)
    sub = (lengths * (cfg.subcarrier_spacing / C_LIGHT)).astype(np.float32)
    k = np.asarray(cfg.subcarriers, np.float32)
    ph = np.float32(-2 * np.pi) * (cyc[..., None] + sub[..., None] * k)  # (..., P, S)
    a = amps.astype(np.float32)[..., None]
    re = np.sum(a * np.cos(ph), axis=-2)
    im = np.sum(a * np.sin(ph), axis=-2)
    return (re + 1j * im).astype(np.complex64)


def _moving_sum(lengths: np.ndarray, amps: np.ndarray, cfg: SimConfig) -> np.ndarray:
    """Moving paths (T, Q, R, A) -> channel (T, R, A, S), as matrix products.

    exp(-j 2 pi (fc + k df) d / c) with d = d_ref + delta (d_ref: the path's mean length) is
    carrier(t) * B_k * exp(-j k eps(t)), eps = 2 pi df delta / c; the last factor is expanded to
    second order, 1 - j k eps - (k eps)^2 / 2. With |delta| < 1 m and |k| <= 28, k eps < 0.18 rad
    and the error is < 1e-3 of the path's amplitude, far below the noise.
    """
    T, Q, R, A = lengths.shape
    k = np.asarray(cfg.subcarriers, np.float32)
    d_ref = lengths.mean(axis=0)  # (Q, R, A)
    cyc = np.mod(lengths * (cfg.fc / C_LIGHT), 1.0).astype(np.float32)
    ph = np.float32(-2 * np.pi) * cyc
    car = (amps.astype(np.float32) * (np.cos(ph) + 1j * np.sin(ph))).astype(np.complex64)
    eps = ((lengths - d_ref) * (2 * np.pi * cfg.subcarrier_spacing / C_LIGHT)).astype(np.float32)
    b = np.exp(-2j * np.pi * (cfg.subcarrier_spacing / C_LIGHT) * d_ref[..., None] * k)  # (Q, R, A, S)
    b = np.ascontiguousarray(np.transpose(b, (1, 2, 0, 3)).reshape(R * A, Q, len(k)), dtype=np.complex64)

    def mm(x: np.ndarray) -> np.ndarray:  # (T, Q, R, A) x (RA, Q, S) -> (RA, T, S)
        return np.transpose(x, (2, 3, 0, 1)).reshape(R * A, T, Q) @ b

    h = mm(car) - 1j * k * mm(car * eps) - 0.5 * k * k * mm(car * eps * eps)
    return np.transpose(h.reshape(R, A, T, -1), (2, 0, 1, 3)).astype(np.complex64)


def walker_channel(scene: Scene, ants: np.ndarray, cfg: SimConfig) -> np.ndarray:
    """(T, R, A, S) channel of the walkers (direct Tx -> walker -> Rx paths), summed exactly."""
    w = walker_positions(scene, cfg)  # (T, M, 3)
    d1 = np.linalg.norm(w - scene.tx, axis=-1)  # (T, M)
    d2 = np.linalg.norm(w[:, None, None] - ants[None, :, :, None], axis=-1)  # (T, R, A, M)
    lengths = d1[:, None, None, :] + d2
    amps = WALKER_RCS / (d1[:, None, None, :] * d2)
    return _phasor_sum(lengths, amps, cfg)


def simulate_csi(scene: Scene, cfg: SimConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """CSI of one scene: a list over receivers of complex64 (T, S, A, 1) arrays."""
    ants = antenna_positions(scene, cfg)  # (R, A, 3)
    d_s, a_s = static_paths(scene, ants)
    h_static = _phasor_sum(d_s, a_s, cfg)  # (R, A, S)
    d_m, a_m = moving_paths(scene, ants, cfg)  # (T, Q, R, A)
    h_move = _moving_sum(d_m, a_m, cfg)  # (T, R, A, S)
    h = h_static[None] + h_move  # (T, R, A, S)
    if cfg.walkers and len(scene.extra.get("walkers", ())):
        h = h + walker_channel(scene, ants, cfg)
    T, R, A, S = h.shape
    if cfg.impairments:
        k = np.asarray(cfg.subcarriers, np.float32)
        cfo = rng.uniform(0, 2 * np.pi, size=(T, R, 1, 1)).astype(np.float32)
        sto = rng.normal(0, 20e-9, size=(T, R, 1, 1))  # timing offset (s): a phase slope over k
        slope = (2 * np.pi * cfg.subcarrier_spacing * sto).astype(np.float32)
        gain = np.exp(rng.normal(0, 0.1, size=(T, R, 1, 1))).astype(np.float32)  # AGC jitter
        ant_phase = rng.uniform(0, 2 * np.pi, size=(1, R, A, 1)).astype(np.float32)  # PLL, fixed
        ph = cfo - slope * k  # (T, R, 1, S), common to the antennas of a NIC
        h = h * (gain * (np.cos(ph) + 1j * np.sin(ph)))
        h = h * (np.cos(ant_phase) + 1j * np.sin(ant_phase))
    if cfg.noise:
        p_static = np.mean(np.abs(h_static) ** 2, axis=(1, 2))  # (R,)
        sigma = np.sqrt(p_static / 2 * 10 ** (-scene.room.snr_db / 10)).astype(np.float32)
        n = rng.standard_normal((T, R, A, S, 2), dtype=np.float32).view(np.complex64)[..., 0]
        h = h + n * sigma[None, :, None, None]
    h = np.ascontiguousarray(np.transpose(h, (1, 0, 3, 2))[..., None], dtype=np.complex64)  # (R, T, S, A, 1)
    return [h[r] for r in range(R)]
