"""GesFi datasets: simulate CSI, run the edge preprocessing on it, store images + labels + domains.

On disk a dataset is a directory:
    manifest.json   what it is: gestures, domain factors and their values, counts, the simulator and
                    preprocessing configs, file hashes
    data.npz        X (N, C, H, W) float32 Doppler images, y (N,) gesture labels, one (N,) int array
                    per domain factor (location, orientation, room, user)
    raw.npz         (optional) the raw CSI of the first few samples: csi (n, R, T, S, A, 1) complex64
The images are made by edge.gesfi.preprocess.doppler_image, the very function the edge agent runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from coach_runtime.errors import UserError
from edge.gesfi import preprocess
from edge.gesfi.preprocess import PreprocessConfig, doppler_image
from models.gesfi.simulate import (
    DOMAIN_VALUES, FACTORS, GESTURES, LOCATIONS, ORIENTATIONS_DEG, ROOMS, SIM_VERSION, USERS, SimConfig,
    make_scene, simulate_csi,
)

log = logging.getLogger(__name__)

FORMAT = "coach-gesfi-dataset"
VERSION = 1


@dataclass(frozen=True)
class DatasetSpec:
    """Which domain values and gestures to simulate (full factorial) and how many repetitions."""

    locations: tuple[int, ...] = tuple(range(len(LOCATIONS)))
    orientations: tuple[int, ...] = tuple(range(len(ORIENTATIONS_DEG)))
    rooms: tuple[int, ...] = tuple(range(len(ROOMS)))
    users: tuple[int, ...] = tuple(range(len(USERS)))
    gestures: tuple[int, ...] = tuple(range(len(GESTURES)))
    reps: int = 1
    seed: int = 0
    raw: int = 3  # keep the raw CSI of this many samples

    def plan(self) -> list[tuple[int, int, int, int, int, int]]:
        """(gesture, location, orientation, room, user, rep) for every sample, in a fixed order."""
        return [
            (g, lo, o, rm, u, r)
            for rm in self.rooms for u in self.users for lo in self.locations
            for o in self.orientations for g in self.gestures for r in range(self.reps)
        ]


@dataclass
class GesFiData:
    x: np.ndarray  # (N, C, H, W) float32
    y: np.ndarray  # (N,) int64
    domains: dict[str, np.ndarray]  # factor -> (N,) int64
    manifest: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray) -> GesFiData:
        return GesFiData(self.x[idx], self.y[idx], {k: v[idx] for k, v in self.domains.items()}, self.manifest)

    @property
    def n_classes(self) -> int:
        return len(self.manifest.get("gestures", GESTURES))


def _simulate_one(args: tuple) -> tuple[np.ndarray, np.ndarray | None]:
    i, item, seed, sim_cfg, pre_cfg, keep_raw = args
    g, lo, o, rm, u, _ = item
    rng = np.random.default_rng([seed, i])  # per-sample stream: same data whatever the workers
    scene = make_scene(g, lo, o, rm, u, rng, sim_cfg)
    rx = simulate_csi(scene, sim_cfg, rng)
    img = doppler_image(rx, pre_cfg)
    return img, (np.stack(rx) if keep_raw else None)


def _chunk(args: list[tuple]) -> list[tuple[np.ndarray, np.ndarray | None]]:
    # One BLAS thread: the matrices are tiny and idle BLAS threads spinning on a shared machine cost
    # five times the work itself. threadpoolctl comes with scikit-learn (the train extra).
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return [_simulate_one(a) for a in args]


def build_dataset(
    spec: DatasetSpec,
    sim_cfg: SimConfig = SimConfig(),
    pre_cfg: PreprocessConfig = PreprocessConfig(),
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> tuple[GesFiData, np.ndarray | None]:
    """Simulate every sample of the spec and preprocess it. Returns (data, raw CSI of the first few)."""
    if sim_cfg.fs != pre_cfg.fs:
        raise ValueError(f"simulator fs {sim_cfg.fs} != preprocessing fs {pre_cfg.fs}")
    plan = spec.plan()
    jobs = [(i, it, spec.seed, sim_cfg, pre_cfg, i < spec.raw) for i, it in enumerate(plan)]
    chunks = [jobs[i : i + 32] for i in range(0, len(jobs), 32)]
    results: list[tuple[np.ndarray, np.ndarray | None]] = []
    if workers <= 1:
        for ch in chunks:
            results += _chunk(ch)
            if progress:
                progress(len(ch))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for ch, res in zip(chunks, pool.map(_chunk, chunks)):
                results += res
                if progress:
                    progress(len(ch))
    arr = np.array(plan, dtype=np.int64).reshape(-1, 6)
    x = np.stack([r[0] for r in results]).astype(np.float32)
    raws = [r[1] for r in results if r[1] is not None]
    raw = np.stack(raws) if raws else None
    data = GesFiData(
        x=x,
        y=arr[:, 0].copy(),
        domains={f: arr[:, k + 1].copy() for k, f in enumerate(FACTORS)},
        manifest=make_manifest(spec, sim_cfg, pre_cfg, x.shape),
    )
    return data, raw


def make_manifest(spec: DatasetSpec, sim_cfg: SimConfig, pre_cfg: PreprocessConfig, shape: tuple) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "n": int(shape[0]),
        "image_shape": [int(s) for s in shape[1:]],
        "gestures": list(GESTURES),
        "factors": {f: list(DOMAIN_VALUES[f]) for f in FACTORS},
        "spec": asdict(spec),
        "simulator": asdict(sim_cfg),
        "simulator_version": SIM_VERSION,
        "preprocess": asdict(pre_cfg),
        "preprocess_version": getattr(preprocess, "PREPROCESS_VERSION", "unknown"),
        "created_by": "coach gesfi simulate",
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_dataset(data: GesFiData, out: str | os.PathLike, raw: np.ndarray | None = None) -> Path:
    """Write the dataset directory atomically (a temp dir next to it, then a rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a dataset is for everyone to read
        arrays = {"X": data.x, "y": data.y, **{f: data.domains[f] for f in FACTORS}}
        np.savez_compressed(tmp / "data.npz", **arrays)
        files = {"data.npz": _sha256(tmp / "data.npz")}
        if raw is not None:
            np.savez_compressed(tmp / "raw.npz", csi=raw)
            files["raw.npz"] = _sha256(tmp / "raw.npz")
        manifest = dict(data.manifest, files=files, counts=_counts(data))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _counts(data: GesFiData) -> dict:
    out = {"gesture": np.bincount(data.y, minlength=data.n_classes).tolist()}
    for f in FACTORS:
        out[f] = np.bincount(data.domains[f], minlength=len(DOMAIN_VALUES[f])).tolist()
    return out


def load_dataset(path: str | os.PathLike) -> GesFiData:
    """Read a dataset directory; a missing or malformed one is a UserError naming the file."""
    path = Path(path)
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise UserError(f"{mpath}: not found; make a dataset with 'coach gesfi simulate --out {path}'")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{mpath}: not valid JSON ({exc}); re-run 'coach gesfi simulate'") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{mpath}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    dpath = path / "data.npz"
    try:
        with np.load(dpath, allow_pickle=False) as z:
            x = z["X"].astype(np.float32, copy=False)
            y = z["y"].astype(np.int64)
            domains = {f: z[f].astype(np.int64) for f in FACTORS}
    except (OSError, KeyError, ValueError) as exc:
        raise UserError(f"{dpath}: unreadable or missing arrays ({exc}); re-run 'coach gesfi simulate'") from None
    if x.ndim != 4 or len(x) != len(y) or any(len(v) != len(y) for v in domains.values()):
        raise UserError(f"{dpath}: inconsistent shapes X{x.shape} y{y.shape}; re-run 'coach gesfi simulate'")
    if not np.isfinite(x).all():
        raise UserError(f"{dpath}: X holds NaN/Inf; re-run 'coach gesfi simulate'")
    return GesFiData(x, y, domains, manifest)


# ---------------------------------------------------------------------------------------------
# Splits


def leave_one_out(data: GesFiData, factor: str, value: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices): the test set is every sample with domain[factor] == value."""
    if factor not in data.domains:
        raise UserError(f"unknown domain factor {factor!r}; one of {', '.join(FACTORS)}")
    d = data.domains[factor]
    test = np.flatnonzero(d == value)
    if len(test) == 0:
        raise UserError(f"the dataset has no sample with {factor} = {value}")
    return np.flatnonzero(d != value), test


def holdout_split(idx: np.ndarray, y: np.ndarray, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified random split of idx into (train, validation) with `frac` of each class held out."""
    rng = np.random.default_rng(seed)
    tr, va = [], []
    for c in np.unique(y[idx]):
        members = rng.permutation(idx[y[idx] == c])
        n_va = int(round(frac * len(members)))
        va.append(members[:n_va])
        tr.append(members[n_va:])
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(va))


def parse_indices(text: str | None, n: int, what: str) -> tuple[int, ...]:
    """'0,2,4' or '0-3' -> indices < n; None -> all."""
    if text is None or text == "all":
        return tuple(range(n))
    out: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                a, b = part.split("-")
                out += list(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise UserError(f"--{what}: expected indices like '0,2' or '0-3', got {text!r}") from None
    bad = [i for i in out if not 0 <= i < n]
    if bad or not out:
        raise UserError(f"--{what}: indices must be in 0..{n - 1}, got {text!r}")
    return tuple(sorted(set(out)))


def with_overrides(spec: DatasetSpec, **kw: Sequence[int] | int) -> DatasetSpec:
    return replace(spec, **{k: v for k, v in kw.items() if v is not None})
