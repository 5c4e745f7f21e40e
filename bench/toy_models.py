"""Small ONNX CNNs built with onnx.helper, for tests and benchmarks of the runtime.

`conv_chain` makes input (1, C0, H, W) -> [Conv 3x3 + Relu] * depth -> GlobalAveragePool -> Gemm ->
logits, with random (seeded) weights. Width and depth set the compute per stage; every Relu output is
a single-tensor cut point of C*H*W float32 elements, so the cut size is known in advance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def conv_chain(path: str | Path, channels: int = 32, size: int = 40, depth: int = 6, in_channels: int = 3,
               classes: int = 10, seed: int = 0) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev, cin = "input", in_channels
    for i in range(depth):
        w = (rng.standard_normal((channels, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))).astype(np.float32)
        b = np.zeros(channels, np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"conv{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"], name=f"relu{i}"))
        prev, cin = f"relu{i}", channels
    nodes.append(helper.make_node("GlobalAveragePool", [prev], ["pool"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"))
    wf = (rng.standard_normal((classes, channels)) * 0.5).astype(np.float32)
    inits += [numpy_helper.from_array(wf, "wf"), numpy_helper.from_array(np.zeros(classes, np.float32), "bf")]
    nodes.append(helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(
        nodes, "conv_chain",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, in_channels, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="coach-bench")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
