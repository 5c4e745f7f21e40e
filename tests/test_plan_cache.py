"""The semantic cache's offline half in `coach plan`: centers.npz and plan.json's `cache` section for a
small numpy-trained classifier with labelled calibration data, recomputed independently from the
bundle's own files; `--no-cache` / no calibration give `cache: null`; a damaged cache is a
BundleError naming the file and the field."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from coach_runtime.cli import main
from partitioner.plan_cli import class_count
from partitioner.semantic_cache import split_held_out
from protos.bundle import POOLING, BundleError, load_bundle
from protos.semantic import margins, normalize, pool
from test_plan_cli import train_mlp, write_profile

BUDGET = 0.5


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    model, x, y = train_mlp()
    data = model.SerializeToString()
    (d / "mlp.onnx").write_bytes(data)
    # 15% wrong labels: the full model "gets those wrong", so they must stay out of the centers
    rng = np.random.default_rng(5)
    wrong = rng.choice(len(y), len(y) * 15 // 100, replace=False)
    y = y.copy()
    y[wrong] = (y[wrong] + rng.integers(1, 10, len(wrong))) % 10
    np.savez(d / "calib.npz", x=x, label=y)
    np.savez(d / "unlabelled.npz", x=x)
    write_profile(d / "edge.json", data, {"fc1": 2.0, "relu1": 0.5, "fc2": 40.0}, "slow-board")
    write_profile(d / "cloud.json", data, {"fc1": 0.05, "relu1": 0.05, "fc2": 0.05}, "gpu-box")
    assert plan(d, d / "b", "--calibration", str(d / "calib.npz")) == 0
    return d


def plan(d: Path, out: Path, *extra: str) -> int:
    return main(["plan", str(d / "mlp.onnx"), "--out", str(out), "--edge-profile", str(d / "edge.json"),
                 "--cloud-profile", str(d / "cloud.json"), "--bandwidth", "0.05,0.2,5", "--no-timing", *extra])


def doc_of(bundle: Path) -> dict:
    return json.loads((bundle / "plan.json").read_text())


def interior(b) -> list[str]:
    return [c.id for c in b.cuts.values() if c.kind == "interior"]


def run(sess, feed):
    return sess.run(None, feed)


# ---------------------------------------------------------------- success paths


def test_bundle_gets_centers_and_a_cache_section_that_round_trips(work):
    out = work / "b"
    b, doc = load_bundle(out), doc_of(out)
    cache = doc["cache"]
    assert cache["file"] == "centers.npz" and cache["pooling"] == POOLING == "gap-l2/2"
    assert cache["sha256"] == hashlib.sha256((out / "centers.npz").read_bytes()).hexdigest()
    assert cache["target_precision"] == 0.99 and cache["labels"] is True
    cuts = interior(b)
    assert cuts and set(cache["cuts"]) == set(cuts)
    assert doc["objective"]["semantic_cache"].startswith("built for")

    with np.load(out / "centers.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    assert set(arrays) == {f"{c}.{a}" for c in cuts for a in ("centers", "valid")}
    for cid in cuts:
        spec, e = b.cache_for(cid), cache["cuts"][cid]
        assert spec is not None and spec.cut_id == cid
        np.testing.assert_array_equal(spec.centers, arrays[f"{cid}.centers"])
        np.testing.assert_array_equal(spec.valid, arrays[f"{cid}.valid"])
        assert spec.centers.dtype == np.float32 and spec.valid.dtype == bool
        assert spec.centers.shape == (e["num_classes"], e["dim"]) == (10, b.cuts[cid].tensors[0].shape[1])
        norms = np.linalg.norm(spec.centers, axis=1)
        np.testing.assert_allclose(norms[spec.valid], 1.0, rtol=1e-5)
        assert (norms[~spec.valid] == 0).all()
        assert (spec.hit, spec.band, spec.band_bits) == (e["hit"], e["band"], e["band_bits"])
        assert spec.held_out == e["held_out"] == 200
        # the MLP's cut tensors are 2-D: every grid pools them alike, and the tie keeps the global average
        assert spec.grid == e["grid"] == 1 and set(e["grid_hit_rates"]) == {"1", "2", "4"}
        with pytest.raises(ValueError):
            spec.centers[0, 0] = 1.0  # shared with every consumer: read-only
    for c in b.cuts.values():
        if c.kind != "interior":
            assert b.cache_for(c.id) is None

    report = (out / "report.md").read_text()
    assert "## Semantic cache" in report
    for cid in cuts:
        assert f"| {cid} |" in report.split("## Semantic cache")[1]


def test_held_out_precision_meets_target_recomputed_from_the_bundle(work):
    """Independently of the planner: features from head.onnx, answers from full.onnx, the documented
    split; the hit threshold's cache answers agree with the full model at >= the target precision."""
    out = work / "b"
    b, doc = load_bundle(out), doc_of(out)
    with np.load(work / "calib.npz") as z:
        x, y = z["x"], z["label"]
    build, held = split_held_out(len(x), doc["cache"]["held_out_fraction"], doc["cache"]["split_seed"])
    assert len(held) == 200 and not set(build) & set(held)
    opts = {"providers": ["CPUExecutionProvider"]}
    full = ort.InferenceSession(str(b.full_path), **opts)
    answers = np.array([run(full, {"x": x[i:i + 1]})[0].argmax() for i in range(len(x))])
    with_hit = 0
    for cid in interior(b):
        spec, e = b.cache_for(cid), doc["cache"]["cuts"][cid]
        head = ort.InferenceSession(str(b.head_path(cid)), **opts)
        names = [t.name for t in b.cuts[cid].tensors]
        feats = []
        for i in range(len(x)):
            outs = dict(zip([o.name for o in head.get_outputs()], run(head, {"x": x[i:i + 1]})))
            feats.append(pool([outs[n] for n in names], spec.grid)[0])
        feats = np.stack(feats)

        # centers: normalised class means of the build samples the full model gets right
        keep = build[answers[build] == y[build]]
        assert 0 < e["centers_from"] == len(keep) < len(build)
        for k in range(spec.num_classes):
            members = keep[answers[keep] == k]
            assert spec.valid[k] == (len(members) > 0)
            if len(members):
                np.testing.assert_allclose(spec.centers[k], normalize(feats[members].sum(0)), atol=1e-5)

        cls, margin, _ = margins(feats[held], spec.centers, spec.valid)
        if spec.hit is None:
            continue
        with_hit += 1
        hits = margin >= spec.hit
        precision = float((cls[hits] == answers[held][hits]).mean())
        assert hits.sum() >= 5
        assert precision >= spec.target_precision
        assert precision == pytest.approx(spec.precision, abs=1e-9)
        assert hits.mean() == pytest.approx(spec.hit_rate, abs=1.01 / len(held))
        # The threshold is the lowest that works: one more (lower-margin) sample breaks the target.
        below = np.sort(margin[~hits])[::-1]
        if len(below):
            wider = margin >= below[0]
            assert (cls[wider] == answers[held][wider]).mean() < spec.target_precision
        if spec.band_bits is not None:
            assert spec.band_bits < e["normal_bits"] and spec.band <= spec.hit
            assert 0 <= spec.band_drop <= BUDGET
    assert with_hit >= 1, "the trained MLP should give at least one cut a hit threshold at 0.99"


def test_band_spends_only_the_budget_the_normal_bits_leave(work):
    b, doc = load_bundle(work / "b"), doc_of(work / "b")
    for cid in interior(b):
        e = doc["cache"]["cuts"][cid]
        normal = b.cuts[cid]
        assert e["normal_bits"] == normal.min_bits
        if e["band_bits"] is None:
            continue
        drop_normal = next(q.accuracy_drop for q in normal.quantization if q.bits == e["normal_bits"]) or 0.0
        assert e["band_drop"] <= BUDGET - drop_normal + 1e-9
        assert e["band_bits"] in doc["objective"]["bits_options"]


def test_lower_target_precision_never_raises_the_threshold(work, tmp_path):
    assert plan(work, tmp_path / "p5", "--calibration", str(work / "calib.npz"), "--cache-precision", "0.5") == 0
    strict, loose = doc_of(work / "b")["cache"]["cuts"], doc_of(tmp_path / "p5")["cache"]["cuts"]
    assert doc_of(tmp_path / "p5")["cache"]["target_precision"] == 0.5
    assert set(strict) == set(loose)
    for cid, e in loose.items():
        assert e["hit"] is not None and e["precision"] >= 0.5
        if strict[cid]["hit"] is not None:
            assert e["hit"] <= strict[cid]["hit"] and e["hit_rate"] >= strict[cid]["hit_rate"]
    assert any(e["hit_rate"] > strict[c]["hit_rate"] for c, e in loose.items())


def test_without_labels_centers_use_every_build_answer(work, tmp_path):
    assert plan(work, tmp_path / "u", "--calibration", str(work / "unlabelled.npz")) == 0
    doc = doc_of(tmp_path / "u")
    assert doc["cache"]["labels"] is False
    n_build = 400 - 200
    for e in doc["cache"]["cuts"].values():
        assert e["centers_from"] == n_build
    assert load_bundle(tmp_path / "u").caches


def test_cache_calibration_builds_the_cache_and_leaves_the_accuracy_to_calibration(work, tmp_path, capsys):
    """--cache-calibration: centers and thresholds from its inputs, the accuracy drops from --calibration's."""
    with np.load(work / "calib.npz") as z:
        x, y = z["x"], z["label"]
    np.savez(tmp_path / "half.npz", x=x[:200], label=y[:200])  # another set: 200 inputs, 100 held out
    assert plan(work, tmp_path / "two", "--calibration", str(work / "calib.npz"),
                "--cache-calibration", str(tmp_path / "half.npz")) == 0
    one, two = doc_of(work / "b"), doc_of(tmp_path / "two")
    sha = hashlib.sha256((tmp_path / "half.npz").read_bytes()).hexdigest()
    assert two["cache"]["calibration"] == {"file": "half.npz", "sha256": sha, "samples": 200}
    assert two["objective"]["calibration"]["sha256"] == one["objective"]["calibration"]["sha256"]
    assert one["cache"]["calibration"]["sha256"] == one["objective"]["calibration"]["sha256"]
    assert [c["quantization"] for c in two["cuts"]] == [c["quantization"] for c in one["cuts"]]
    build, held = split_held_out(200, 0.5, two["cache"]["split_seed"])
    for e in two["cache"]["cuts"].values():
        assert e["held_out"] == len(held) == 100 and e["centers_from"] <= len(build)
    assert load_bundle(tmp_path / "two").caches
    # without --calibration there is no accuracy to measure: a one-line error, no bundle
    assert plan(work, tmp_path / "x", "--cache-calibration", str(tmp_path / "half.npz")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--cache-calibration needs --calibration" in err[0]
    assert not (tmp_path / "x").exists()


def test_no_cache_and_no_calibration_give_null(work, tmp_path, capsys):
    assert plan(work, tmp_path / "off", "--calibration", str(work / "calib.npz"), "--no-cache") == 0
    assert plan(work, tmp_path / "nocal") == 0
    for name, why in (("off", "--no-cache"), ("nocal", "no --calibration")):
        out = tmp_path / name
        doc, b = doc_of(out), load_bundle(out)
        assert doc["cache"] is None and not (out / "centers.npz").exists()
        assert doc["objective"]["semantic_cache"].startswith("none: ") and why in doc["objective"]["semantic_cache"]
        assert b.caches == {} and all(b.cache_for(c) is None for c in b.cuts)
        assert "No semantic cache in this bundle" in (out / "report.md").read_text()


def test_bad_cache_flags_are_one_line_errors(work, tmp_path, capsys):
    for flag, value in (("--cache-precision", "1.5"), ("--cache-precision", "0"), ("--cache-precision", "x"),
                        ("--cache-held-out", "1"), ("--cache-held-out", "-0.2"), ("--cache-grids", "0"),
                        ("--cache-grids", "2,x"), ("--cache-grids", "32")):
        assert plan(work, tmp_path / "x", "--calibration", str(work / "calib.npz"), flag, value) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and flag in err[0] and "Traceback" not in err[0]
        assert not (tmp_path / "x").exists()


def test_a_version_1_cache_loads_with_the_global_average(work, tmp_path):
    """Bundles planned before the grid (pooling gap-l2/1, no grid field) keep their meaning."""
    def older(d):
        d["cache"]["pooling"] = "gap-l2/1"
        for e in d["cache"]["cuts"].values():
            e.pop("grid", None)
    b = load_bundle(damaged(work, tmp_path, plan_edit=older, rehash=False))
    assert all(s.grid == 1 and s.pooling == "gap-l2/1" for s in b.caches.values()) and b.caches


def test_class_count_recognises_class_score_vectors():
    assert class_count((1, 10)) == 10 and class_count((10,)) == 10 and class_count((1, 10, 1, 1)) == 10
    assert class_count((1, 3, 4, 4)) is None and class_count((1, 1)) is None and class_count(()) is None
    assert class_count(None) is None


# ---------------------------------------------------------------- damaged caches


def damaged(work: Path, tmp_path: Path, arrays_edit=None, plan_edit=None, rehash: bool = True) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(work / "b", dst)
    if arrays_edit is not None:
        with np.load(dst / "centers.npz") as z:
            arrays = {k: z[k] for k in z.files}
        arrays_edit(arrays)
        np.savez(dst / "centers.npz", **arrays)
    doc = doc_of(dst)
    if plan_edit is not None:
        plan_edit(doc)
    if rehash:
        doc["cache"]["sha256"] = hashlib.sha256((dst / "centers.npz").read_bytes()).hexdigest()
    (dst / "plan.json").write_text(json.dumps(doc))
    return dst


def expect(path: Path, *fragments: str) -> str:
    with pytest.raises(BundleError) as info:
        load_bundle(path)
    msg = str(info.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    return msg


def first_cut(work: Path) -> str:
    return sorted(doc_of(work / "b")["cache"]["cuts"])[0]


def test_centers_of_the_wrong_shape_name_the_file_and_field(work, tmp_path):
    cid = first_cut(work)

    def edit(a):
        a[f"{cid}.centers"] = a[f"{cid}.centers"][:, :-1]
    expect(damaged(work, tmp_path, edit), "centers.npz", f"'{cid}.centers'", f"cache.cuts.{cid}", "[10, 15]")


@pytest.mark.parametrize("what, edit, fragments", [
    ("missing array", lambda cid: lambda a: a.pop(f"{cid}.valid"), ("centers.npz", "no array", ".valid")),
    ("valid not bool", lambda cid: lambda a: a.update({f"{cid}.valid": a[f"{cid}.valid"].astype(np.int64)}),
     ("centers.npz", ".valid", "int64")),
    ("non-finite", lambda cid: lambda a: a[f"{cid}.centers"].__setitem__((0, 0), np.nan),
     ("centers.npz", "non-finite")),
])
def test_bad_centers_arrays(work, tmp_path, what, edit, fragments):
    expect(damaged(work, tmp_path, edit(first_cut(work))), *fragments)


def test_modified_centers_file_fails_its_hash(work, tmp_path):
    d = damaged(work, tmp_path, lambda a: a.update(extra=np.zeros(1)), rehash=False)
    expect(d, "centers.npz", "cache.sha256")
    d2 = tmp_path / "gone"
    shutil.copytree(work / "b", d2)
    (d2 / "centers.npz").unlink()
    expect(d2, "centers.npz", "missing")


def _entry(doc: dict) -> dict:
    return doc["cache"]["cuts"][sorted(doc["cache"]["cuts"])[0]]


@pytest.mark.parametrize("edit, fragments", [
    (lambda d: d["cache"].update(pooling="max/2"), ("cache.pooling", "max/2")),
    (lambda d: d["cache"].update(target_precision=1.5), ("cache.target_precision",)),
    (lambda d: _entry(d).update(grid=0), ("grid", ">= 1")),
    (lambda d: _entry(d).update(grid=17), ("grid", "1 to 16")),
    (lambda d: d["cache"].pop("cuts"), ("cache.cuts", "missing")),
    (lambda d: _entry(d).update(band_bits=5, band=0.0), ("band_bits", "5")),
    (lambda d: _entry(d).update(band_bits=None, band=0.01), ("band_bits", "both")),
    (lambda d: _entry(d).update(hit=3.0), ("hit", "[0, 2]")),
    (lambda d: _entry(d).update(hit_rate=1.5), ("hit_rate", "fraction")),
    (lambda d: _entry(d).update(num_classes=11), ("centers.npz", "[11,")),
    (lambda d: d["cache"]["cuts"].update({"edge-only": _entry(d)}), ("cache.cuts.edge-only", "edge-only")),
    (lambda d: d["cache"]["cuts"].update({"no-such-cut": _entry(d)}), ("cache.cuts.no-such-cut",)),
    (lambda d: d.update(cache=[1]), ("'cache'", "object")),
])
def test_bad_cache_fields(work, tmp_path, edit, fragments):
    expect(damaged(work, tmp_path, plan_edit=edit, rehash=False), "plan.json" if fragments[0] != "centers.npz"
           else "centers.npz", *fragments)


# ---------------------------------------------------------------- models of other shapes


def test_head_runs_are_batched_when_the_head_takes_a_batch_axis(work):
    """A model with a free batch axis: head outputs computed 32 samples a time equal one by one."""
    import onnx

    from partitioner.accuracy import AccuracyMeter, load_calibration
    from partitioner.profile import session
    from partitioner.split import TensorType

    model, _, _ = train_mlp()
    for vi in list(model.graph.input) + list(model.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_param = "N"
    onnx.checker.check_model(model)
    cal = load_calibration(work / "calib.npz", {"x": TensorType("x", "float32", (-1, 64))})
    assert cal.batched["x"]
    head = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model)).extract_model(["x"], ["a1"])
    sess = session(head.SerializeToString(), what="head")

    class Counting:
        calls = 0

        def __getattr__(self, name):
            return getattr(sess, name)

        def run(self, names, feed):
            Counting.calls += 1
            return sess.run(names, feed)

    batched = AccuracyMeter(model.SerializeToString(), cal, None, batch=32)._head_outputs(Counting())
    assert Counting.calls == -(-cal.samples // 32)
    single = AccuracyMeter(model.SerializeToString(), cal, None, batch=1)._head_outputs(Counting())
    assert Counting.calls == -(-cal.samples // 32) + cal.samples
    assert len(batched) == len(single) == cal.samples
    for a, b in zip(batched, single):
        assert a["a1"].shape == b["a1"].shape == (1, 16)
        np.testing.assert_allclose(a["a1"], b["a1"], rtol=1e-5, atol=1e-6)


def test_an_output_that_is_not_a_class_vector_gets_no_cache(work, tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    model, x, _ = train_mlp()
    g = model.graph
    g.initializer.append(numpy_helper.from_array(np.array([1, 2, 5], np.int64), "shape3"))
    g.node.append(helper.make_node("Reshape", ["logits", "shape3"], ["grid"], name="reshape"))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("grid", TensorProto.FLOAT, [1, 2, 5]))
    data = model.SerializeToString()
    (tmp_path / "grid.onnx").write_bytes(data)
    times = {"fc1": 2.0, "relu1": 0.5, "fc2": 40.0, "reshape": 0.01}
    write_profile(tmp_path / "e.json", data, times, "slow-board")
    write_profile(tmp_path / "c.json", data, {k: 0.05 for k in times}, "gpu-box")
    assert main(["plan", str(tmp_path / "grid.onnx"), "--out", str(tmp_path / "g"), "--edge-profile",
                 str(tmp_path / "e.json"), "--cloud-profile", str(tmp_path / "c.json"), "--bandwidth", "0.05,5",
                 "--no-timing", "--calibration", str(work / "unlabelled.npz")]) == 0
    doc = doc_of(tmp_path / "g")
    assert doc["cache"] is None and "not a class-score vector" in doc["objective"]["semantic_cache"]


def test_the_agent_starts_from_the_plans_hit_rate_and_follows_the_live_one(work):
    """The cut choice counts the cache's hits (edge.adapt.CutProfile.latency_ms): the plan's held-out
    hit rate until lookups at the cut replace it with the cache's live one; no cache, no hits."""
    from edge.agent import Agent, AgentConfig

    b = load_bundle(work / "b")
    with Agent(b, AgentConfig(cloud=None, cache=True)) as agent:
        cached = [cid for cid in interior(b) if cid in agent.caches]
        assert cached
        for cid, p in agent.quantizer.cuts.items():
            assert p.hit_rate == pytest.approx(b.cache_for(cid).hit_rate if cid in cached else 0.0)
        cid = cached[0]
        cache = agent.caches[cid]
        assert cache.hit_rate == pytest.approx(b.cache_for(cid).hit_rate)
        sure = cache.centers[int(np.flatnonzero(cache.valid)[0])]  # on a center: a hit
        between = normalize(cache.centers[cache.valid].sum(axis=0))  # no margin: never a hit
        for feature, low, high in ((sure, 0.8, 1.0), (between, 0.0, 0.2)):
            for _ in range(40):
                cache.decide(feature)
                with agent._lock:
                    agent._observe(cid, hit_rate=cache.hit_rate)
            assert low <= agent.quantizer.cuts[cid].hit_rate <= high
            assert agent.quantizer.cuts[cid].hit_rate == cache.hit_rate
    with Agent(b, AgentConfig(cloud=None, cache=False)) as agent:
        assert all(p.hit_rate == 0.0 for p in agent.quantizer.cuts.values())


def test_the_cache_and_the_bank_share_the_accuracy_budget(work):
    """The stream's accuracy budget pays for wrong cache hits and for narrow widths: the cache gets
    `cache_budget_share` of it (or what the plan's held-out inputs say it spends, if more), the
    quantizer's bank the rest; without a cache the bank has it all."""
    from edge.agent import Agent, AgentConfig

    b = load_bundle(work / "b")
    budget = b.accuracy_budget
    with Agent(b, AgentConfig(cloud=None, cache=True, cache_budget_share=0.4)) as agent:
        assert agent.caches
        planned = max(100.0 * b.cache_for(cid).hit_rate * (1.0 - (b.cache_for(cid).precision or 0.0))
                      for cid in agent.caches)
        share = max(planned, 0.4 * budget)
        assert agent._cache_budget() == pytest.approx(share)
        assert agent.quantizer.bank.budget == pytest.approx(budget - share)
        for cid, cache in agent.caches.items():
            band = (b.cache_for(cid).band_drop or 0.0) if cache.config.band_bits is not None else 0.0
            assert cache.config.drop_budget == pytest.approx(max(0.0, share - band))
            assert cache.config.hit_rate == pytest.approx(b.cache_for(cid).hit_rate)
    with Agent(b, AgentConfig(cloud=None, cache=False)) as agent:
        assert agent.quantizer.bank.budget == pytest.approx(budget)
