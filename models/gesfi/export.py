"""ONNX export of a trained GesFiNet, checked against torch with onnxruntime; weights as .npz.

The exported graph (opset 17, input "image" (batch, C, H, W) float32, output "logits"
(batch, n_classes), dynamic batch) is what the planner splits between edge and cloud.
Checkpoints are plain arrays in an .npz (no pickle): save_weights / load_weights.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
OPSET = 17


def export_onnx(model: nn.Module, path: str | os.PathLike, input_shape: tuple[int, ...]) -> Path:
    """Export model (eval mode) to ONNX at path with a dynamic batch dimension."""
    path = Path(path)
    model.eval()
    dummy = torch.zeros((1, *input_shape[1:]), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model, (dummy,), str(path),
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET, do_constant_folding=True, dynamo=False,
        )
    return path


def verify_onnx(model: nn.Module, path: str | os.PathLike, x: np.ndarray) -> float:
    """Max relative difference between onnxruntime and torch logits on x: max|a-b| / max|b|."""
    import onnxruntime as ort

    model.eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    got = sess.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})[0]
    if got.shape != ref.shape:
        raise RuntimeError(f"{path}: onnxruntime output shape {got.shape} != torch {ref.shape}")
    return float(np.max(np.abs(got - ref)) / max(float(np.max(np.abs(ref))), 1e-12))


def save_weights(model: nn.Module, path: str | os.PathLike) -> Path:
    """state_dict as plain float arrays in an .npz (keys are the parameter names)."""
    arrays = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    np.savez(path, **arrays)
    return Path(path)


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    with np.load(path, allow_pickle=False) as z:
        state = {k: torch.from_numpy(z[k].copy()) for k in z.files}
    model.load_state_dict(state)
    return model
