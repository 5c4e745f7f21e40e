"""Input sources for the edge agent. Each yields `edge.sample.Sample`s (batch of one) in order.

Spec strings (`coach edge run --source SPEC`):
  FILE.npz            arrays keyed by the model's input names; the first axis indexes samples
                      (an optional `label` array gives ground truth)
  DIR                 every *.npz in the directory, in name order, one after another
  synthetic[:N]       N random inputs shaped like the model's inputs (default 100)
  csi:PATH | csi+udp://HOST:PORT   GesFi: CSI capture(s) turned into Doppler images (edge.gesfi.source)
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from coach_runtime.errors import UserError
from edge.sample import Sample

_NP = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "int64": np.int64,
       "int32": np.int32, "uint8": np.uint8, "int8": np.int8, "bool": np.bool_}


def npz_samples(path: Path, inputs: Sequence, start_id: int = 0) -> Iterator[Sample]:
    """Samples of one .npz file, checked against the model's input specs."""
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise UserError(f"{path}: not a readable .npz file ({exc})") from None
    with z:
        names = [s.name for s in inputs]
        missing = [n for n in names if n not in z.files]
        if missing:
            raise UserError(f"{path}: no array for model input(s) {missing}; it has {z.files}")
        arrays = {s.name: z[s.name] for s in inputs}
        labels = z["label"] if "label" in z.files else None
    counts = {n: a.shape[0] if a.ndim else 0 for n, a in arrays.items()}
    if len(set(counts.values())) != 1:
        raise UserError(f"{path}: input arrays disagree on the number of samples: {counts}")
    for s in inputs:
        a = arrays[s.name]
        want = tuple(s.shape[1:])
        got = a.shape[1:]
        if len(want) != len(got) or any(w > 0 and w != g for w, g in zip(want, got)):
            raise UserError(f"{path}: array '{s.name}' has per-sample shape {list(got)}, model expects {list(want)}")
    n = next(iter(counts.values()))
    for i in range(n):
        feeds = {s.name: np.ascontiguousarray(arrays[s.name][i : i + 1], dtype=_NP.get(s.dtype, np.float32))
                 for s in inputs}
        label = int(labels[i]) if labels is not None else None
        yield Sample(id=start_id + i, inputs=feeds, label=label, meta={"file": str(path), "index": i})


def synthetic_samples(inputs: Sequence, n: int, seed: int = 0) -> Iterator[Sample]:
    rng = np.random.default_rng(seed)
    for i in range(n):
        feeds = {}
        for s in inputs:
            shape = [d if d > 0 else 1 for d in s.shape]
            feeds[s.name] = rng.standard_normal(shape).astype(_NP.get(s.dtype, np.float32))
        yield Sample(id=i, inputs=feeds)


def open_source(spec: str, inputs: Sequence) -> Iterator[Sample]:
    """Parse a source spec (see module doc) for a model with input specs `inputs`."""
    if spec.startswith("synthetic"):
        _, _, count = spec.partition(":")
        try:
            n = int(count) if count else 100
        except ValueError:
            raise UserError(f"source '{spec}': the count after 'synthetic:' must be an integer") from None
        return synthetic_samples(inputs, n)
    if spec.startswith("csi:") or spec.startswith("csi+udp://"):
        from edge.gesfi.source import open_csi_source

        if len(inputs) != 1:
            raise UserError(f"source '{spec}': GesFi sources feed one image input; the model has {len(inputs)}")
        from edge.gesfi.preprocess import PreprocessConfig

        return open_csi_source(spec, inputs[0].name, PreprocessConfig())
    path = Path(spec)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise UserError(f"source directory {path} has no .npz files")
        return _chain(files, inputs)
    if path.suffix == ".npz" and path.exists():
        return npz_samples(path, inputs)
    raise UserError(f"source '{spec}': not an .npz file, a directory of them, 'synthetic[:N]' or 'csi:PATH'")


def _chain(files: list[Path], inputs) -> Iterator[Sample]:
    next_id = 0
    for f in files:
        for s in npz_samples(f, inputs, start_id=next_id):
            next_id = s.id + 1
            yield s
