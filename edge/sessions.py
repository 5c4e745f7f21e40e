"""onnxruntime sessions on the device: providers chosen by availability, checked by a warm-up run."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PREFERRED = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
SHORT = {"tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
         "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
               "tensor(int8)": np.int8, "tensor(bool)": np.bool_}


def choose_providers(requested: list[str] | None = None) -> list[str]:
    """Requested providers (short names allowed) that this onnxruntime has; else the best available."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    if requested:
        names = [SHORT.get(p.lower(), p) for p in requested]
        missing = [p for p in names if p not in have]
        for p in missing:
            log.warning("provider %s is not available here (have: %s); skipping it", p, ", ".join(have))
        names = [p for p in names if p in have]
    else:
        names = [p for p in PREFERRED if p in have]
    if "CPUExecutionProvider" not in names:
        names.append("CPUExecutionProvider")
    return names


def dummy_inputs(session) -> dict[str, np.ndarray]:
    """Zeros for every input of `session`, symbolic dims set to 1."""
    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
        feeds[i.name] = np.zeros(shape, _ORT_DTYPES.get(i.type, np.float32))
    return feeds


def load_session(path: str | Path, providers: list[str], threads: int = 1):
    """An InferenceSession whose first run succeeded; providers that fail it are dropped with a warning."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    remaining = list(providers)
    while True:
        try:
            session = ort.InferenceSession(str(path), sess_options=opts, providers=remaining)
            session.run(None, dummy_inputs(session))
            return session
        except Exception as exc:
            if remaining == ["CPUExecutionProvider"]:
                raise
            dropped = remaining.pop(0)
            log.warning("provider %s failed its warm-up on %s (%s); dropping it", dropped, Path(path).name, exc)
