"""Shared fixtures: running the `coach` CLI, and a small planned bundle for runtime tests."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_coach(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "coach_runtime.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="session")
def coach():
    return run_coach


@pytest.fixture
def free_port() -> int:
    """A localhost TCP port nothing listens on (for servers that need a fixed port, e.g. metrics)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def toy_bundle(tmp_path_factory):
    """A 4-block conv chain planned with 32/8 bits at 2 and 50 Mbit/s (edge profile slowed x3)."""
    from bench.toy_models import conv_chain

    d = tmp_path_factory.mktemp("toy")
    model = conv_chain(d / "conv.onnx", channels=16, size=24, depth=4)
    r = run_coach("plan", str(model), "--out", str(d / "bundle"), "--bits", "32,8", "--bandwidth", "2,50",
                  "--runs", "3", "--edge-slowdown", "3")
    assert r.returncode == 0, r.stderr
    return d / "bundle"
