"""The edge agent against a real `coach cloud serve` on localhost: order, exactly once, faults, security."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from bench.load_bench import ServerProcess
from edge.agent import Agent, AgentConfig
from edge.sources import open_source

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(toy_bundle):
    return toy_bundle


@pytest.fixture(scope="module")
def interior(bundle):
    """The plan's interior cut: tests of the mechanics pin it, so the adaptive policy can't go edge-only."""
    from protos.bundle import load_bundle

    return next(c.id for c in load_bundle(bundle).cuts.values() if c.kind == "interior")


@pytest.fixture
def cloud(bundle):
    srv = ServerProcess(["--bundle", str(bundle), "--listen", "127.0.0.1:0"])
    yield srv
    print("cloud stderr:", *srv.stderr_lines[-20:], sep="\n  ")  # shown by pytest when a test fails
    if srv.proc.poll() is None:
        srv.proc.kill()
        srv.proc.wait()


def local_classes(bundle, samples):
    import onnxruntime as ort

    s = ort.InferenceSession(str(bundle / "full.onnx"), providers=["CPUExecutionProvider"])
    return [int(np.argmax(s.run(None, x.inputs)[0])) for x in samples]


def test_results_in_order_exactly_once_and_equal_to_the_full_model(bundle, cloud, interior):
    agent = Agent(bundle, AgentConfig(cloud=f"127.0.0.1:{cloud.port}", bits=32, cut=interior, cache=False))
    with agent:
        results = list(agent.run(open_source("synthetic:60", agent.inputs)))
    assert [r.id for r in results] == list(range(60))
    assert all(r.where == "cloud" for r in results)
    expect = local_classes(bundle, list(open_source("synthetic:60", agent.inputs)))
    assert [r.cls for r in results] == expect  # 32-bit: the split model is the full model
    t = results[-1].timing
    assert t["total_ms"] >= t["edge_ms"] and t["wire_ms"] >= 0 and t["cloud_ms"] > 0


def test_cloud_killed_midway_then_restarted(bundle, cloud, interior):
    """kill -9 the cloud while requests are in flight, restart it: every input answered once, in order."""
    port = cloud.port
    agent = Agent(bundle, AgentConfig(cloud=f"127.0.0.1:{port}", cut=interior, cache=False, deadline_ms=2000,
                                      link={"backoff_max_s": 0.5}))
    results, restarted = [], {}

    def chaos():
        while len(results) < 60:
            time.sleep(0.01)
        cloud.proc.send_signal(signal.SIGKILL)
        cloud.proc.wait()
        time.sleep(1.0)
        restarted["srv"] = ServerProcess(["--bundle", str(bundle), "--listen", f"127.0.0.1:{port}"])
        restarted["at"] = len(results)

    t = threading.Thread(target=chaos, daemon=True)
    t.start()
    with agent:
        for r in agent.run(open_source("synthetic:800", agent.inputs), rate_hz=100):
            results.append(r)
    t.join(30)
    try:
        assert [r.id for r in results] == list(range(800))
        where = [r.where for r in results]
        assert "edge" in where  # computed locally while the cloud was away
        after = where[restarted["at"]:]
        assert agent.stats["reconnects"] >= 1 and "cloud" in after  # collaboration resumed
        assert agent.stats["fallback"] == where.count("edge")
    finally:
        srv = restarted.get("srv")
        if srv is not None:
            srv.proc.kill()
            srv.proc.wait()


def test_slow_cloud_past_the_deadline_is_computed_locally(bundle, cloud, interior):
    """300 ms each way between edge and cloud, a 200 ms deadline: every input is computed locally,
    exactly once, and the cloud's late answers are dropped."""
    from bench.link import LinkEmulator

    emu = LinkEmulator("127.0.0.1:0", ("127.0.0.1", cloud.port), "const:50", "const:50", delay_ms=300).start()
    try:
        agent = Agent(bundle, AgentConfig(cloud=f"127.0.0.1:{emu.address[1]}", cache=False, deadline_ms=200,
                                          bits=32, cut=interior, connect_timeout_s=10))
        with agent:
            results = list(agent.run(open_source("synthetic:20", agent.inputs), rate_hz=20))
            time.sleep(1.0)  # let the late answers arrive
        assert [r.id for r in results] == list(range(20))
        assert agent.stats["fallback"] == 20 and agent.stats["cloud"] == 0
        assert agent.stats["late"] > 0
    finally:
        emu.stop()


def test_cli_resumes_without_duplicating(coach, bundle, cloud, tmp_path):
    out = tmp_path / "res.jsonl"
    r = coach("edge", "run", "--bundle", str(bundle), "--cloud", f"127.0.0.1:{cloud.port}",
              "--source", "synthetic:30", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:12]) + "\n" + lines[12][:9])  # killed mid-write: a torn line
    r = coach("edge", "run", "--bundle", str(bundle), "--cloud", f"127.0.0.1:{cloud.port}",
              "--source", "synthetic:30", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    ids = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert ids == list(range(30))


def test_unreachable_cloud_is_one_line_exit_2(coach, bundle):
    r = coach("edge", "run", "--bundle", str(bundle), "--cloud", "127.0.0.1:9", "--source", "synthetic:3")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "unreachable" in r.stderr and "Traceback" not in r.stderr


def test_negative_deadline_rtt_factor_is_one_line_exit_2(coach, bundle):
    r = coach("edge", "run", "--bundle", str(bundle), "--cloud", "127.0.0.1:9", "--source", "synthetic:3",
              "--deadline-rtt-factor", "-1")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--deadline-rtt-factor" in r.stderr


def test_bits_rule_reaches_every_adaptive_cut_and_a_bad_one_is_refused(bundle):
    from coach_runtime.errors import UserError

    for rule in ("least-drop", "highest"):
        agent = Agent(bundle, AgentConfig(cloud="127.0.0.1:9", offline_ok=True, cache=False, bits_rule=rule))
        assert {c.bits_rule for c in agent.quantizer.cuts.values()} == {rule}
    with pytest.raises(UserError, match="bits rule 'fewest'"):
        Agent(bundle, AgentConfig(cloud="127.0.0.1:9", offline_ok=True, bits_rule="fewest"))


def test_offline_ok_computes_locally(bundle):
    agent = Agent(bundle, AgentConfig(cloud="127.0.0.1:9", offline_ok=True, cache=False))
    with agent:
        results = list(agent.run(open_source("synthetic:5", agent.inputs)))
    assert [r.where for r in results] == ["edge"] * 5


def test_damaged_bundle_is_one_line_exit_2(coach, bundle, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    head = next(bad.glob("cuts/*/head.onnx"))
    head.write_bytes(head.read_bytes()[:-10])
    r = coach("edge", "run", "--bundle", str(bad), "--source", "synthetic:3")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "head.onnx" in r.stderr and "Traceback" not in r.stderr


def test_bad_source_is_one_line_exit_2(coach, bundle, tmp_path):
    npz = tmp_path / "x.npz"
    np.savez(npz, input=np.zeros((2, 3, 5, 5), np.float32))
    r = coach("edge", "run", "--bundle", str(bundle), "--source", str(npz))
    assert r.returncode == 2 and "per-sample shape" in r.stderr and r.stderr.count("\n") == 1


def test_edge_path_never_imports_torch(bundle):
    code = ("import sys; from edge.agent import Agent, AgentConfig; from edge.sources import open_source; "
            f"a = Agent({str(bundle)!r}, AgentConfig(cache=False)); "
            "list(a.run(open_source('synthetic:3', a.inputs))); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'partitioner', 'cloud', 'models')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_tls_and_token_from_the_edge(coach, bundle, tmp_path, interior):
    from cloud.auth import add_device
    from cloud.certs import make_dev_certs

    certs = tmp_path / "certs"
    certs.mkdir()
    make_dev_certs(certs)
    tokens = tmp_path / "tokens"
    token = add_device(tokens, "jetson-1")
    srv = ServerProcess(["--bundle", str(bundle), "--listen", "127.0.0.1:0", "--tls-cert", str(certs / "server.pem"),
                         "--tls-key", str(certs / "server.key"), "--client-ca", str(certs / "ca.pem"),
                         "--tokens", str(tokens)])
    try:
        tls = {"tls_ca": str(certs / "ca.pem"), "tls_cert": str(certs / "client.pem"), "tls_key": str(certs / "client.key")}
        ok = Agent(bundle, AgentConfig(cloud=f"localhost:{srv.port}", cut=interior, cache=False,
                                       link={**tls, "token": token}))
        with ok:
            results = list(ok.run(open_source("synthetic:5", ok.inputs)))
        assert [r.where for r in results] == ["cloud"] * 5
        r = coach("edge", "run", "--bundle", str(bundle), "--cloud", f"localhost:{srv.port}", "--source", "synthetic:2",
                  "--tls-ca", tls["tls_ca"], "--tls-cert", tls["tls_cert"], "--tls-key", tls["tls_key"],
                  "--token", "wrong")
        assert r.returncode == 2 and "UNAUTHENTICATED" in r.stderr and r.stderr.count("\n") == 1
    finally:
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(30) == 0


@pytest.mark.parametrize("interval_s", [0.0, 0.5])
def test_probes_calibrate_an_estimator_that_nothing_queues_for(bundle, interval_s, free_port):
    """Paced inputs on an ample link never queue, so no request's timing says what the link can do
    (the estimator stays uncalibrated); probe pairs (two copies of an input through the cloud-only
    cut, back to back) calibrate it. Their answers are no results: still one per input, in order;
    and they are measure_only: the cloud runs nothing for them (its metrics count them apart)."""
    from bench.link import LinkEmulator

    mport = free_port
    cloud = ServerProcess(["--bundle", str(bundle), "--listen", "127.0.0.1:0", "--metrics-port", str(mport)])
    emu = LinkEmulator("127.0.0.1:0", ("127.0.0.1", cloud.port), "const:50", "const:50", delay_ms=5).start()
    try:
        agent = Agent(bundle, AgentConfig(cloud=f"127.0.0.1:{emu.address[1]}", cache=False,
                                          calibrate_interval_s=interval_s, probe_interval_s=interval_s))
        with agent:
            results = list(agent.run(open_source("synthetic:60", agent.inputs), rate_hz=20))
        assert [r.id for r in results] == list(range(60))
        if interval_s:
            assert agent.stats["probe_bytes"] > 0 and agent.estimator.calibrated
            assert agent.estimator.estimate_mbps() is not None
            # measure_only: the cloud ran nothing for them (one run per result it answered, no more)
            text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
            probes = float(re.search(r"^coach_probes_total (\S+)$", text, re.M).group(1))
            runs = float(re.search(r'^coach_stage_seconds_count\{stage="compute"\} (\S+)$', text, re.M).group(1))
            assert probes >= 3 and runs == sum(r.where == "cloud" for r in results)
        else:
            assert agent.stats["probe_bytes"] == 0 and not agent.estimator.calibrated
    finally:
        emu.stop()
        cloud.stop()
