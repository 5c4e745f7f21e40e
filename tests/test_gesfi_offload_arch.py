"""GesFiNet arch="offload" (compact stem, heavy body: the demo's split-worthy workload)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.gesfi.export import export_onnx, load_weights, save_weights, verify_onnx
from models.gesfi.net import GesFiNet, n_params
from models.gesfi.train import TrainConfig

ort = pytest.importorskip("onnxruntime")


def test_offload_shapes_and_compact_stem():
    net = GesFiNet(arch="offload").eval()
    x = torch.zeros(3, 3, 32, 32)
    assert net(x).shape == (3, 6)
    stem = net.features.conv[:2](x)  # the two downsampling blocks: the early cut
    assert stem.shape == (3, 32, 8, 8) and stem[0].numel() == 2048 < 3 * 32 * 32
    assert n_params(net) > 20 * n_params(GesFiNet())  # heavy body: worth offloading
    assert n_params(GesFiNet(arch="offload", depth=2, body_width=64)) < n_params(net)


def test_offload_exports_to_onnx_and_reloads(tmp_path):
    torch.manual_seed(0)
    net = GesFiNet(arch="offload", depth=2, body_width=48).eval()
    path = export_onnx(net, tmp_path / "m.onnx", (1, 3, 32, 32))
    x = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    assert verify_onnx(net, path, x) < 1e-4
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sess.run(["logits"], {"image": x})[0].shape == (4, 6)
    save_weights(net, tmp_path / "w.npz")
    other = load_weights(GesFiNet(arch="offload", depth=2, body_width=48).eval(), tmp_path / "w.npz")
    with torch.no_grad():
        assert torch.equal(other(torch.from_numpy(x)), net(torch.from_numpy(x)))


def test_arch_is_validated():
    with pytest.raises(ValueError):
        GesFiNet(arch="huge")
    with pytest.raises(ValueError):
        TrainConfig(arch="huge")
    with pytest.raises(ValueError):
        TrainConfig(arch="offload", depth=0)
    assert TrainConfig().arch == "compact"  # the default model is unchanged


def test_demo_trains_the_offload_arch_and_its_cache_stamp_says_so():
    from bench import demo

    assert demo.MODEL_ARGS[:2] == ["--arch", "offload"]
    assert "--arch offload" in demo.cache_version() and "--threads 1" in demo.cache_version()


def test_demo_plans_again_when_its_calibration_sets_change(tmp_path):
    import hashlib
    import json

    from bench import demo
    from protos.bundle import POOLING

    accuracy, cache = tmp_path / "heldout.npz", tmp_path / "calib.npz"
    accuracy.write_bytes(b"the images the drops were measured on")
    cache.write_bytes(b"the images the cache was built from")
    bundle = tmp_path / "bundle"
    bundle.mkdir()

    def planned_with(a: bytes, c: bytes) -> None:
        plan = {"objective": {"calibration": {"sha256": hashlib.sha256(a).hexdigest()}},
                "cache": {"pooling": POOLING, "calibration": {"sha256": hashlib.sha256(c).hexdigest()}}}
        (bundle / "plan.json").write_text(json.dumps(plan))

    planned_with(accuracy.read_bytes(), cache.read_bytes())
    assert not demo.plan_is_stale(bundle, accuracy, cache)
    planned_with(cache.read_bytes(), cache.read_bytes())  # one set for both (the demo before stop 19)
    assert demo.plan_is_stale(bundle, accuracy, cache)
    planned_with(accuracy.read_bytes(), b"another cache set")
    assert demo.plan_is_stale(bundle, accuracy, cache)
    (bundle / "plan.json").write_text("{not json")
    assert demo.plan_is_stale(bundle, accuracy, cache)
