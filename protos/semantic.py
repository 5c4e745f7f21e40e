"""How a cut tensor becomes a semantic feature, and how it is compared with the label centers.

This is part of the bundle contract: `centers.npz` (written by the planner) holds L2-normalised class
centers of features made by `pool`, and the edge compares live features with them by `margins`.

- pool: average over every axis after the channel axis (N, C, H, W) -> (N, C) (grid 1, global), or
  over the cells of a grid x grid partition of the last two axes (a 3-D tensor: grid cells along its
  last axis) -> (N, C * cells), channel-major; an axis shorter than the grid gets one cell per element.
  A 2-D tensor is taken as is; several cut tensors are concatenated; the result is L2-normalised.
  Global pooling keeps what a channel detects and drops where: enough after many layers, too little
  after a few (a shallow cut's channels are edge and texture detectors; their layout tells the
  classes apart), so the planner picks the grid per cut (partitioner.semantic_cache.choose_grid).
- margins: cosine similarity to each center; the margin is top-1 minus top-2 similarity.
"""

from __future__ import annotations

import numpy as np


def pool(tensors: list[np.ndarray], grid: int = 1) -> np.ndarray:
    """(N, D) L2-normalised features of a batch of cut tensors (first axis = batch)."""
    parts = []
    for t in tensors:
        t = np.asarray(t, np.float32)
        if t.ndim == 1:
            t = t[None]
        if t.ndim <= 2:
            parts.append(t.reshape(t.shape[0], -1))
        elif grid <= 1:
            parts.append(t.reshape(t.shape[0], t.shape[1], -1).mean(axis=2))
        else:
            parts.append(grid_means(t, grid))
    f = np.concatenate(parts, axis=1)
    return normalize(f)


def grid_means(t: np.ndarray, grid: int) -> np.ndarray:
    """(N, C * cells): means of (N, C, ..., H, W) over the cells of a grid x grid split of (H, W)
    (axes between C and H are averaged whole; a 3-D tensor is split along its last axis)."""
    n, c = t.shape[:2]
    if t.ndim == 3:
        t = t[:, :, None, :]
    t = t.reshape(n, c, -1, t.shape[-2], t.shape[-1]).mean(axis=2)
    rows = np.array_split(np.arange(t.shape[2]), min(grid, t.shape[2]))
    cols = np.array_split(np.arange(t.shape[3]), min(grid, t.shape[3]))
    cells = [t[:, :, r[0]:r[-1] + 1, k[0]:k[-1] + 1].mean(axis=(2, 3)) for r in rows for k in cols]
    return np.stack(cells, axis=2).reshape(n, -1)


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
