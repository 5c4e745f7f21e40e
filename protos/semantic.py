"""How a cut tensor becomes a semantic feature, and how it is compared with the label centers.

This is part of the bundle contract: `centers.npz` (written by the planner) holds L2-normalised class
centers of features made by `pool`, and the edge compares live features with them by `margins`.

- pool: global average over every axis after the channel axis (N, C, H, W) -> (N, C); a 2-D tensor is
  taken as is; several cut tensors are concatenated; the result is L2-normalised.
- margins: cosine similarity to each center; the margin is top-1 minus top-2 similarity.
"""

from __future__ import annotations

import numpy as np


def pool(tensors: list[np.ndarray]) -> np.ndarray:
    """(N, D) L2-normalised features of a batch of cut tensors (first axis = batch)."""
    parts = []
    for t in tensors:
        t = np.asarray(t, np.float32)
        if t.ndim == 1:
            t = t[None]
        parts.append(t.reshape(t.shape[0], t.shape[1], -1).mean(axis=2) if t.ndim > 2 else t.reshape(t.shape[0], -1))
    f = np.concatenate(parts, axis=1)
    return normalize(f)


def normalize(f: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(f, axis=-1, keepdims=True)
    return f / np.maximum(n, 1e-12)


def margins(features: np.ndarray, centers: np.ndarray, valid: np.ndarray | None = None):
    """(class, margin, top-1 similarity) for each row of `features` against `centers` (K, D).

    `valid` masks classes that have no center (never seen in calibration)."""
    sims = np.atleast_2d(features) @ centers.T
    if valid is not None:
        sims = np.where(valid[None, :], sims, -np.inf)
    order = np.argsort(-sims, axis=1)
    top1 = np.take_along_axis(sims, order[:, :1], axis=1)[:, 0]
    top2 = np.take_along_axis(sims, order[:, 1:2], axis=1)[:, 0] if sims.shape[1] > 1 else np.full_like(top1, -1.0)
    top2 = np.where(np.isfinite(top2), top2, -1.0)
    return order[:, 0], top1 - top2, top1
