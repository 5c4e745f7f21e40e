"""GesFi model, training (ERM / DANN / GesFi), ONNX export and the train / eval commands."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch

from coach_runtime.cli import main
from models.gesfi.dataset import DatasetSpec, build_dataset, save_dataset
from models.gesfi.export import INPUT_NAME, OUTPUT_NAME, export_onnx, load_weights, save_weights, verify_onnx
from models.gesfi.net import GesFiNet, grad_reverse, n_params
from models.gesfi.train import (
    TrainConfig, accuracy, cluster_domains, learn_domain_feature, probe_accuracy, standardize_within_classes, train,
)

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """108 simulated samples: one room and user, one location, three orientations, 6 reps per gesture."""
    spec = DatasetSpec(locations=(0,), orientations=(1, 2, 3), rooms=(0,), users=(0,), reps=6, seed=5, raw=0)
    data, _ = build_dataset(spec)
    path = tmp_path_factory.mktemp("gesfi") / "small"
    save_dataset(data, path)
    return data, path


def test_net_shapes_and_size():
    net = GesFiNet().eval()
    out = net(torch.zeros(5, 3, 32, 32))
    assert out.shape == (5, 6)
    assert n_params(net) < 250_000  # ~0.6 MB fp32: fits a Jetson's cache budget for real time


def test_grad_reverse_negates_and_scales():
    x = torch.randn(4, 3, requires_grad=True)
    grad_reverse(x, 0.7).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, -0.7))
    y = torch.randn(4, 3)
    assert torch.equal(grad_reverse(y, 0.3), y)


def test_cluster_domains_picks_k_by_silhouette():
    rng = np.random.default_rng(0)
    centers = np.array([[0, 0], [6, 0], [0, 6]], float)
    z = np.concatenate([c + rng.normal(0, 0.5, size=(60, 2)) for c in centers])
    labels, k, table = cluster_domains(z, 0, 6, seed=0)
    assert k == 3 and set(table) == {2, 3, 4, 5, 6} and table[3] == max(table.values())
    assert len(set(labels[:60])) == 1 and len(set(labels)) == 3
    _, k2, table2 = cluster_domains(z, 5, 6, seed=0)  # a fixed K is taken as given
    assert k2 == 5 and list(table2) == [5]


def test_classwise_standardisation_strips_a_linear_class_signal():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 60)
    dom = rng.integers(0, 2, size=len(y))
    z = np.stack([3.0 * y + rng.normal(0, 0.3, len(y)), 2.0 * dom + rng.normal(0, 0.3, len(y))], axis=1)
    assert probe_accuracy(z, y, 0) > 0.9 and probe_accuracy(z, dom, 0) > 0.9
    zc = standardize_within_classes(z, y)
    assert probe_accuracy(zc, y, 0) < 0.45  # chance is 0.25
    assert probe_accuracy(zc, dom, 0) > 0.9  # the domain survives
    for c in range(4):
        assert np.allclose(zc[y == c].mean(0), 0, atol=1e-5) and np.allclose(zc[y == c].std(0), 1, atol=1e-3)


def test_profile_domain_feature_ignores_when_the_gesture_happens(small):
    """domain_input='profile' sees the Doppler profile only: shifting the images in time changes nothing."""
    data, _ = small
    x, y = data.x[:48], data.y[:48]
    shifted = np.roll(x, 7, axis=-1)
    feats = {}
    for inp in ("profile", "image"):
        cfg = TrainConfig(mine_epochs=2, batch_size=16, domain_input=inp, threads=1)
        for name, xx in (("orig", x), ("shift", shifted)):
            torch.manual_seed(0)
            feats[inp, name] = learn_domain_feature(xx, y, data.n_classes, cfg)
    assert feats["profile", "orig"].shape == (48, 16)
    assert np.allclose(feats["profile", "orig"], feats["profile", "shift"], atol=1e-5)
    assert not np.allclose(feats["image", "orig"], feats["image", "shift"], atol=1e-3)
    with pytest.raises(ValueError):
        TrainConfig(domain_input="spectrum")


def test_erm_learns(small):
    """A test-sized configuration learns the gestures well above chance (1/6) on held-out samples."""
    data, _ = small
    cfg = TrainConfig(method="erm", epochs=12, batch_size=32, val_frac=0.25, seed=0, threads=1)
    res = train(data, None, cfg)
    assert res.history[-1]["train_acc"] > 0.8
    assert res.val_acc > 0.6, res.val_acc
    assert len(res.val_idx) >= 24 and not set(res.val_idx) & set(res.train_idx)


def test_dann_and_gesfi_run(small):
    data, _ = small
    d = train(data, None, TrainConfig(method="dann", domain_factor="orientation", epochs=3, batch_size=32, seed=1,
                                   threads=1))
    assert "domain_acc" in d.history[-1]
    g = train(data, None, TrainConfig(method="gesfi", epochs=3, mine_epochs=3, k_max=4, batch_size=32, seed=1,
                                   threads=1))
    lat = g.latent
    assert lat is not None and 2 <= lat.k <= 4 and set(lat.silhouette) == {2, 3, 4}
    assert lat.labels.shape == g.train_idx.shape and set(lat.labels) == set(range(lat.k))
    assert {"nmi_gesture", "nmi_orientation", "gesture_probe_acc"} <= set(lat.diagnostics)
    assert 0 <= lat.diagnostics["gesture_probe_acc"] <= 1


def test_export_matches_torch_and_has_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    net = GesFiNet().eval()
    x = np.random.default_rng(0).random((7, 3, 32, 32), dtype=np.float32)
    path = export_onnx(net, tmp_path / "m.onnx", x.shape)
    assert verify_onnx(net, path, x) <= 1e-4
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == [INPUT_NAME]
    assert [o.name for o in sess.get_outputs()] == [OUTPUT_NAME]
    for n in (1, 3):
        assert sess.run(None, {INPUT_NAME: x[:n]})[0].shape == (n, 6)
    save_weights(net, tmp_path / "w.npz")
    other = load_weights(GesFiNet().eval(), tmp_path / "w.npz")
    with torch.no_grad():
        assert torch.equal(net(torch.from_numpy(x)), other(torch.from_numpy(x)))
    with np.load(tmp_path / "w.npz", allow_pickle=False) as z:  # plain arrays, no pickle
        assert all(z[k].dtype != object for k in z.files)


def test_train_cli_writes_model_and_metrics(small, tmp_path, capsys):
    data, path = small
    out = tmp_path / "model"
    argv = ["gesfi", "train", "--data", str(path), "--method", "gesfi", "--out", str(out), "--epochs", "3",
            "--mine-epochs", "2", "--seed", "3", "--threads", "1"]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model.onnx", "weights.npz"]
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "gesfi" and m["latent_domains"]["k"] >= 2
    assert m["onnx"]["max_rel_err_vs_torch"] <= 1e-4 and m["onnx"]["input"] == "image"
    assert zipfile.is_zipfile(out / "weights.npz")
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"image": data.x[:4]})[0]
    assert logits.shape == (4, 6) and np.isfinite(logits).all()
    capsys.readouterr()
    assert main(argv) == 2  # exists
    assert main(["gesfi", "train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("coach: error:") for line in err)
    assert not (tmp_path / "o").exists()


def test_eval_cli_table_json_png(small, tmp_path):
    _, path = small
    out = tmp_path / "ev"
    argv = ["gesfi", "eval", "--data", str(path), "--out", str(out), "--methods", "erm,gesfi",
            "--splits", "orientation", "--seeds", "2", "--epochs", "2", "--mine-epochs", "1",
            "--k-sweep", "2,3", "--threads", "1"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert len(res["runs"]) == 4
    held = {(r["method"], r["seed"]): r["held_out"] for r in res["runs"]}
    assert held[("erm", 0)] == held[("gesfi", 0)] == 1 and held[("erm", 1)] == 2  # rotate: seed s -> value s
    for r in res["runs"]:
        assert 0 <= r["test_acc"] <= 1 and sum(map(sum, r["confusion"])) == 36
    assert set(res["summary"]["overall"]) == {"erm", "gesfi"}
    assert [row["k"] for row in res["k_sensitivity"]] == [2, 3]
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["gesfi", "eval", "--data", str(path), "--methods", "svm"]) == 2


def test_accuracy_helper():
    net = GesFiNet().eval()
    x = np.zeros((3, 3, 32, 32), np.float32)
    pred = net(torch.from_numpy(x)).argmax(1).numpy()
    assert accuracy(net, x, pred) == 1.0
    assert accuracy(net, x, (pred + 1) % 6) == 0.0
