"""The edge agent against a real `coach cloud serve` on localhost: order, exactly once, faults, security."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bench.load_bench import ServerProcess
from bench.toy_models import conv_chain
from edge.agent import Agent, AgentConfig
from edge.sources import open_source

ROOT = Path(__file__).resolve().parents[1]


def coach(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "coach_runtime.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    d = tmp_path_factory.mktemp("agent")
    model = conv_chain(d / "conv.onnx", channels=16, size=24, depth=4)
    out = d / "bundle"
    r = coach("plan", str(model), "--out", str(out), "--bits", "32,8", "--bandwidth", "2,50", "--runs", "3",
              "--edge-slowdown", "3")
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture
def cloud(bundle):
    srv = ServerProcess(["--bundle", str(bundle), "--listen", "127.0.0.1:0"])
    yield srv
    if srv.proc.poll() is None:
        srv.proc.kill()
        srv.proc.wait()


def local_classes(bundle, samples):
    import onnxruntime as ort

    s = ort.InferenceSession(str(bundle / "full.onnx"), providers=["CPUExecutionProvider"])
    return [int(np.argmax(s.run(None, x.inputs)[0])) for x in samples]


def test_results_in_order_exactly_once_and_equal_to_the_full_model(bundle, cloud):
    agent = Agent(bundle, AgentConfig(cloud=f"127.0.0.1:{cloud.port}", bits=32, cache=False))
    with agent:
        results = list(agent.run(open_source("synthetic:60", agent.inputs)))
    assert [r.id for r in results] == list(range(60))
    assert all(r.where == "cloud" for r in results)
    expect = local_classes(bundle, list(open_source("synthetic:60", agent.inputs)))
    assert [r.cls for r in results] == expect  # 32-bit: the split model is the full model
    t = results[-1].timing
    assert t["total_ms"] >= t["edge_ms"] and t["wire_ms"] >= 0 and t["cloud_ms"] > 0


def test_cloud_killed_midway_then_restarted(bundle, cloud, tmp_path):
    """kill -9 the cloud while requests are in flight, restart it: every input answered once, in order."""
    port = cloud.port
    agent = Agent(bundle, AgentConfig(cloud=f"127.0.0.1:{port}", cache=False, deadline_ms=2000))
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
        for r in agent.run(open_source("synthetic:400", agent.inputs), rate_hz=100):
            results.append(r)
    t.join(30)
    try:
        assert [r.id for r in results] == list(range(400))
        where = [r.where for r in results]
        assert "edge" in where  # computed locally while the cloud was away
        assert where[-1] == "cloud" and agent.stats["reconnects"] >= 1  # collaboration resumed
        assert agent.stats["fallback"] == where.count("edge")
    finally:
        srv = restarted.get("srv")
        if srv is not None:
            srv.proc.kill()
            srv.proc.wait()


def test_deadline_computes_locally_and_drops_late_answers(bundle, cloud):
    agent = Agent(bundle, AgentConfig(cloud=f"127.0.0.1:{cloud.port}", cache=False, deadline_ms=0.01))
    with agent:
        results = list(agent.run(open_source("synthetic:40", agent.inputs)))
    assert [r.id for r in results] == list(range(40))
    assert agent.stats["fallback"] + agent.stats["cloud"] == 40
    assert agent.stats["fallback"] > 0


def test_cli_resumes_without_duplicating(bundle, cloud, tmp_path):
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


def test_unreachable_cloud_is_one_line_exit_2(bundle):
    r = coach("edge", "run", "--bundle", str(bundle), "--cloud", "127.0.0.1:9", "--source", "synthetic:3")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "unreachable" in r.stderr and "Traceback" not in r.stderr


def test_offline_ok_computes_locally(bundle):
    agent = Agent(bundle, AgentConfig(cloud="127.0.0.1:9", offline_ok=True, cache=False))
    with agent:
        results = list(agent.run(open_source("synthetic:5", agent.inputs)))
    assert [r.where for r in results] == ["edge"] * 5


def test_damaged_bundle_is_one_line_exit_2(bundle, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    head = next(bad.glob("cuts/*/head.onnx"))
    head.write_bytes(head.read_bytes()[:-10])
    r = coach("edge", "run", "--bundle", str(bad), "--source", "synthetic:3")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "head.onnx" in r.stderr and "Traceback" not in r.stderr


def test_bad_source_is_one_line_exit_2(bundle, tmp_path):
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


def test_tls_and_token_from_the_edge(bundle, tmp_path):
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
        ok = Agent(bundle, AgentConfig(cloud=f"localhost:{srv.port}", cache=False, link={**tls, "token": token}))
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
