"""Mahimahi traces, the pure link model, and the TCP link emulator (bench/link.py)."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from bench.link import LinkEmulator, fidelity, measure_goodput, parse_hostport
from bench.mahimahi import (
    PACKET_BYTES,
    TRACES_DIR,
    capacity_mbps,
    constant_trace,
    load_trace,
    parse_trace,
    simulate_messages,
    trace_stats,
)
from coach_runtime.cli import main as coach_main
from coach_runtime.errors import UserError

SHIPPED = ["ATT-LTE-driving-2016.up", "Verizon-LTE-short.up", "TMobile-LTE-short.up"]


# ---------------------------------------------------------------- traces


def _expand(trace, cycles):
    """All opportunity times of the first `cycles` periods, by brute force."""
    return np.concatenate([c * trace.period_ms + trace.timestamps_ms for c in range(cycles)])


def test_count_and_time_of_match_brute_force():
    rng = np.random.default_rng(0)
    ts = np.sort(rng.integers(0, 50, size=40))
    ts[-1] = 50
    trace = parse_trace("\n".join(map(str, ts)) + "\n", "random")
    times = _expand(trace, 6)
    for t in rng.uniform(0, 5 * 50, size=200):
        assert trace.count(t) == np.sum(times <= t)
        assert trace.count_before(t) == np.sum(times < t)
    idx = np.arange(times.size)
    np.testing.assert_array_equal(trace.time_of(idx), times)


def test_parse_rejects_bad_traces():
    for text in ["", "0\n0\n", "5\n3\n", "1\nabc\n", "-1\n4\n"]:
        with pytest.raises(UserError):
            parse_trace(text, "bad")
    with pytest.raises(UserError, match="cannot read trace"):
        load_trace("/nonexistent/trace.up")
    with pytest.raises(UserError):
        load_trace("const:-3")


@pytest.mark.parametrize("mbps", [0.5, 1.0, 7.3, 8.0, 12.0, 48.0, 100.0])
def test_constant_trace_has_the_rate(mbps):
    trace = constant_trace(mbps)
    assert trace.mean_mbps == pytest.approx(mbps, rel=1e-3)
    # over any long interval, not only whole periods
    assert capacity_mbps(trace, 123.4, 10_123.4) == pytest.approx(mbps, rel=5e-3)


def test_shipped_traces_match_their_readme():
    """The copies in bench/traces are the mahimahi traces (mean capacity as the README says)."""
    expected = {"ATT-LTE-driving-2016.up": 1.91, "TMobile-LTE-short.up": 13.3,
                "Verizon-LTE-short.up": 5.95}
    for name in SHIPPED:
        assert (TRACES_DIR / name).exists()
        t = load_trace(name)  # found by name in bench/traces
        assert t.mean_mbps == pytest.approx(expected[name], rel=0.01)
        s = trace_stats(t)
        assert s.p5_mbps <= s.p50_mbps <= s.p95_mbps
    assert (TRACES_DIR / "ATTRIBUTION.md").read_text().count("Winstein") >= 1


def _simulate_bytes(trace, send, size, cycles):
    """Reference: walk every opportunity, moving up to 1500 queued bytes each."""
    times = _expand(trace, cycles)
    done = np.full(len(send), np.nan)
    queue = []  # [message index, bytes left]
    i = 0
    for t in times:
        while i < len(send) and send[i] <= t:
            queue.append([i, size[i]])
            i += 1
        budget = PACKET_BYTES
        while queue and budget > 0:
            take = min(budget, queue[0][1])
            queue[0][1] -= take
            budget -= take
            if queue[0][1] == 0:
                done[queue.pop(0)[0]] = t
        if i == len(send) and not queue:
            break
    return done


@pytest.mark.parametrize("name", ["const:3", "ATT-LTE-driving-2016.up"])
def test_simulate_messages_matches_per_opportunity_reference(name):
    trace = load_trace(name)
    rng = np.random.default_rng(1)
    send = np.sort(rng.uniform(0, 4000, size=300))
    size = rng.integers(1, 6000, size=300)
    got = simulate_messages(trace, send, size, delay_ms=7.0)
    cycles = 2 + int(20_000 // trace.period_ms)
    want = _simulate_bytes(trace, send, size, cycles)
    assert not np.any(np.isnan(want))
    np.testing.assert_allclose(got, want + 7.0)


# ---------------------------------------------------------------- emulator


@pytest.mark.parametrize("trace", ["const:8", "ATT-LTE-driving-2016.up"])
def test_fidelity_goodput_within_10_percent(trace):
    r = fidelity(trace, 3.0)
    assert r["capacity_mbps"] > 0.5  # the interval is not an outage (else the check is empty)
    assert abs(r["goodput_mbps"] / r["capacity_mbps"] - 1) <= 0.10, r
    assert r["within_10pct"]


def test_downlink_with_delay_is_shaped_too():
    g = measure_goodput("const:4", 1.5, direction="down", delay_ms=30.0, warmup_s=0.3)
    assert g.goodput_mbps == pytest.approx(4.0, rel=0.10)


def test_link_is_shared_by_connections():
    """Two connections through one const:6 uplink get 6 Mbit/s together, not each."""
    server = socket.create_server(("127.0.0.1", 0))
    with LinkEmulator("127.0.0.1:0", server.getsockname(), "const:6", "const:100") as emu:
        clients = [socket.create_connection(emu.address) for _ in range(2)]
        uppers = [server.accept()[0] for _ in range(2)]
        stop = threading.Event()
        got = [0, 0]

        def push(sock):
            sock.settimeout(0.1)
            while not stop.is_set():
                try:
                    sock.send(bytes(65536))
                except (TimeoutError, OSError):
                    pass

        def pull(k, sock):
            sock.settimeout(0.1)
            while not stop.is_set():
                try:
                    got[k] += len(sock.recv(1 << 20))
                except (TimeoutError, OSError):
                    pass

        threads = [threading.Thread(target=push, args=(c,)) for c in clients]
        threads += [threading.Thread(target=pull, args=(k, u)) for k, u in enumerate(uppers)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(2.0)
        stop.set()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        for s in clients + uppers:
            s.close()
        stats = emu.stats()
    server.close()
    assert min(got) > 0  # both made progress
    total_mbps = sum(got) * 8 / 1e6 / elapsed
    assert total_mbps <= 6.0 * 1.10  # capacity is shared; it cannot exceed the link
    assert stats["connections"] == 2
    assert stats["up_bytes"] >= sum(got)


def test_backpressure_bounds_what_the_sender_can_write():
    """A slow link must block the sender instead of swallowing bytes (TCP cannot drop)."""
    server = socket.create_server(("127.0.0.1", 0))
    q = 16 * 1024
    addr = server.getsockname()
    with LinkEmulator("127.0.0.1:0", addr, "const:1", "const:1", queue_bytes=q) as emu:
        client = socket.socket()
        # the sender's own kernel buffer is the sender's business (Linux lets it grow to
        # tcp_wmem[2], 4 MB, on loopback); keep it small to see the proxy's part
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        client.connect(emu.address)
        upper, _ = server.accept()
        client.setblocking(False)
        written, deadline = 0, time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                written += client.send(bytes(65536))
            except BlockingIOError:
                time.sleep(0.01)
        stats = emu.stats()
        # 1 Mbit/s for ~1 s is ~125 kB; the queue, the proxy's and the sender's socket buffers
        # add ~250 kB. Without backpressure the proxy would swallow GBs in that second.
        assert written < 600_000
        assert stats["up_bytes"] < 200_000
        assert stats["up_queued_bytes"] <= q + 64 * 1024
        client.close()
        upper.close()
    server.close()


def _echo_server():
    import grpc
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req[::-1])}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def test_grpc_passes_through_and_is_shaped():
    grpc = pytest.importorskip("grpc")
    server, port = _echo_server()
    try:
        with LinkEmulator("127.0.0.1:0", ("127.0.0.1", port), "const:8", "const:8",
                          delay_ms=20.0) as emu:
            host, eport = emu.address
            with grpc.insecure_channel(f"{host}:{eport}") as channel:
                echo = channel.unary_unary("/test.Echo/Echo")
                assert echo(b"hello", timeout=10) == b"olleh"
                payload = np.random.default_rng(2).bytes(300_000)
                t0 = time.monotonic()
                reply = echo(payload, timeout=20)
                elapsed = time.monotonic() - t0
            stats = emu.stats()
    finally:
        server.stop(None)
    assert reply == payload[::-1]
    # 300 kB each way at 8 Mbit/s is 0.3 s each way, plus 20 ms each way: a shaped link
    # cannot be faster than that (a lower bound: holds on any machine)
    assert elapsed >= 0.9 * (2 * 300_000 * 8 / 8e6 + 0.040)
    assert stats["up_bytes"] >= 300_000 and stats["down_bytes"] >= 300_000


def test_half_close_and_unreachable_upstream():
    server = socket.create_server(("127.0.0.1", 0))
    with LinkEmulator("127.0.0.1:0", server.getsockname(), "const:20", "const:20") as emu:
        client = socket.create_connection(emu.address)
        upper, _ = server.accept()
        client.sendall(b"x" * 10_000)
        client.shutdown(socket.SHUT_WR)  # client done sending, still reading
        upper.settimeout(5)
        got = b""
        while chunk := upper.recv(65536):
            got += chunk
        assert got == b"x" * 10_000  # everything, then EOF
        upper.sendall(b"reply")
        upper.close()
        client.settimeout(5)
        back = b""
        while chunk := client.recv(65536):
            back += chunk
        assert back == b"reply"
        client.close()
    free = server.getsockname()
    server.close()  # nothing listens there any more
    with LinkEmulator("127.0.0.1:0", free, "const:20", "const:20") as emu:
        client = socket.create_connection(emu.address)
        client.settimeout(5)
        try:
            assert client.recv(10) == b""
        except ConnectionResetError:
            pass
        client.close()
        assert emu.stats()["failed_upstream_connects"] == 1


def test_cli_errors_are_one_line(capsys):
    assert coach_main(["bench", "link", "--up", "const:8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--down" in err and "--listen" in err
    argv = ["bench", "link", "--up", "nope.up", "--down", "const:1", "--listen", ":0",
            "--upstream", "127.0.0.1:1"]
    assert coach_main(argv) == 2
    assert "nope.up" in capsys.readouterr().err
    with pytest.raises(UserError):
        parse_hostport("localhost")
