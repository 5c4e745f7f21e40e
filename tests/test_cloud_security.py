"""Security of the cloud service: dev certificates, TLS, mutual TLS, hashed per-device bearer tokens,
per-device stream limits, and bundles verified by sha256 before they are served."""

import asyncio
import collections
import contextlib
import hashlib
import ipaddress
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509

from bench.load_bench import write_tiny_bundle
from cloud.auth import TokenStore, add_device, bearer, hash_token
from cloud.certs import FILES, make_dev_certs
from cloud.server import ServerConfig, TlsConfig, serve
from cloud.tails import Runtime, load_model
from protos import codec
from protos.coach.v1 import coach_pb2 as pb
from protos.coach.v1 import coach_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(write_tiny_bundle(tmp_path_factory.mktemp("b") / "tiny"), Runtime(("CPUExecutionProvider",), 1))


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    make_dev_certs(d)
    return d


def _good(model, i):
    h = np.ones((1, 8, 8, 8), np.float32)
    return pb.InferRequest(request_id=i, model=model.name, cut_id="c1", tensors=[codec.encode(h, 8, name="h")])


@contextlib.asynccontextmanager
async def _server(model, **cfg):
    running = await serve([model], ServerConfig(listen="127.0.0.1:0", **cfg))
    try:
        yield running
    finally:
        await running.shutdown(grace_s=1)


def _creds(certs, client_cert=True):
    kw = {}
    if client_cert:
        kw = {"private_key": (certs / "client.key").read_bytes(), "certificate_chain": (certs / "client.pem").read_bytes()}
    return grpc.ssl_channel_credentials(root_certificates=(certs / "ca.pem").read_bytes(), **kw)


async def _try_infer(channel, model, metadata=None):
    stub = pb_grpc.CollaborativeInferenceStub(channel)
    try:
        r = await stub.Infer(_good(model, 1), timeout=10, metadata=metadata)
        return r.error.code
    except grpc.aio.AioRpcError as exc:
        return exc.code()


def test_dev_certs_files_permissions_and_sans(certs):
    for f in FILES:
        mode = stat.S_IMODE((certs / f).stat().st_mode)
        assert mode == (0o600 if f.endswith(".key") else 0o644), (f, oct(mode))
    server = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    ca = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    assert server.issuer == ca.subject
    server.verify_directly_issued_by(ca)
    x509.load_pem_x509_certificate((certs / "client.pem").read_bytes()).verify_directly_issued_by(ca)


def test_certs_cli_writes_a_complete_dir_and_refuses_a_full_one(tmp_path):
    run = [sys.executable, "-m", "coach_runtime.cli", "cloud", "certs"]
    r = subprocess.run(run + [str(tmp_path / "c"), "--host", "cloud.example", "--ip", "10.0.0.5"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted(FILES)
    san = x509.load_pem_x509_certificate((tmp_path / "c" / "server.pem").read_bytes()).extensions \
        .get_extension_for_class(x509.SubjectAlternativeName).value
    assert "cloud.example" in san.get_values_for_type(x509.DNSName)
    before = (tmp_path / "c" / "ca.pem").read_bytes()
    r = subprocess.run(run + [str(tmp_path / "c")], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--force" in r.stderr
    assert (tmp_path / "c" / "ca.pem").read_bytes() == before  # untouched
    r = subprocess.run(run + [str(tmp_path / "c"), "--force"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and (tmp_path / "c" / "ca.pem").read_bytes() != before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_tls_serves_verified_clients_and_refuses_plaintext(model, certs):
    async def go():
        async with _server(model, tls=TlsConfig(certs / "server.pem", certs / "server.key")) as running:
            port = running.port
            async with grpc.aio.secure_channel(f"localhost:{port}", _creds(certs, client_cert=False)) as ch:
                ok_name = await _try_infer(ch, model)
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", _creds(certs, client_cert=False)) as ch:
                ok_ip = await _try_infer(ch, model)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                plain = await _try_infer(ch, model)
            return ok_name, ok_ip, plain

    ok_name, ok_ip, plain = asyncio.run(go())
    assert ok_name == 0 and ok_ip == 0
    assert plain == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate_from_the_ca(model, certs, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    make_dev_certs(other)  # a different CA: its client certificate must not be accepted

    async def go():
        tls = TlsConfig(certs / "server.pem", certs / "server.key", client_ca=certs / "ca.pem")
        async with _server(model, tls=tls) as running:
            addr = f"localhost:{running.port}"
            async with grpc.aio.secure_channel(addr, _creds(certs)) as ch:
                with_cert = await _try_infer(ch, model)
            async with grpc.aio.secure_channel(addr, _creds(certs, client_cert=False)) as ch:
                without = await _try_infer(ch, model)
            foreign = grpc.ssl_channel_credentials(
                root_certificates=(certs / "ca.pem").read_bytes(),
                private_key=(other / "client.key").read_bytes(),
                certificate_chain=(other / "client.pem").read_bytes())
            async with grpc.aio.secure_channel(addr, foreign) as ch:
                wrong_ca = await _try_infer(ch, model)
            return with_cert, without, wrong_ca

    with_cert, without, wrong_ca = asyncio.run(go())
    assert with_cert == 0
    assert without == grpc.StatusCode.UNAVAILABLE and wrong_ca == grpc.StatusCode.UNAVAILABLE


def test_token_file_is_hashed_and_parsed_strictly(tmp_path):
    f = tmp_path / "tokens.txt"
    t1 = add_device(f, "jetson-1")
    t2 = add_device(f, "jetson-2")
    text = f.read_text()
    assert t1 not in text and t2 not in text and hash_token(t1) in text
    assert hash_token(t1) == hashlib.sha256(t1.encode()).hexdigest()
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    store = TokenStore.load(f)
    assert store.device_for(t1) == "jetson-1" and store.device_for(t2) == "jetson-2"
    assert store.device_for("guess") is None and store.device_for(None) is None
    with pytest.raises(ValueError, match="already has a token"):
        add_device(f, "jetson-1")
    for bad, where in [("dev\n", ":1"), ("a " + "0" * 63 + "\n", ":1"), ("# c\na " + "0" * 64 + "\na " + "1" * 64, "twice")]:
        g = tmp_path / "bad.txt"
        g.write_text(bad)
        with pytest.raises(ValueError, match=where):
            TokenStore.load(g)
    assert bearer([("authorization", "Bearer abc")]) == "abc"
    assert bearer([("authorization", "Basic abc")]) is None and bearer([]) is None


def test_tokens_required_for_every_rpc_but_health_stays_open(model, tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    f = tmp_path / "tokens.txt"
    token = add_device(f, "jetson-1")
    good_md = (("authorization", f"Bearer {token}"),)
    bad_md = (("authorization", f"Bearer {token}x"),)

    async def go():
        async with _server(model, tokens=TokenStore.load(f)) as running, \
                grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = pb_grpc.CollaborativeInferenceStub(ch)
            res = {"infer_none": await _try_infer(ch, model), "infer_bad": await _try_infer(ch, model, bad_md),
                   "infer_ok": await _try_infer(ch, model, good_md)}
            for name, md in (("stream_none", None), ("stream_bad", bad_md), ("stream_ok", good_md)):
                try:
                    out = [r async for r in stub.Stream(iter([_good(model, 1), _good(model, 2)]), metadata=md)]
                    res[name] = [r.error.code for r in out]
                except grpc.aio.AioRpcError as exc:
                    res[name] = (exc.code(), exc.details())
            for name, md in (("describe_none", None), ("describe_ok", good_md)):
                try:
                    res[name] = len((await stub.Describe(pb.DescribeRequest(), metadata=md)).bundles)
                except grpc.aio.AioRpcError as exc:
                    res[name] = exc.code()
            st = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
            res["health"] = st.status
            return res

    res = asyncio.run(go())
    unauth = grpc.StatusCode.UNAUTHENTICATED
    assert res["infer_none"] == unauth and res["infer_bad"] == unauth and res["infer_ok"] == 0
    assert res["stream_none"][0] == unauth and "Bearer" in res["stream_none"][1]
    assert res["stream_bad"][0] == unauth and "not valid" in res["stream_bad"][1]
    assert res["stream_ok"] == [0, 0]
    assert res["describe_none"] == unauth and res["describe_ok"] == 1
    assert res["health"] == health_pb2.HealthCheckResponse.SERVING


def test_denied_streams_always_reach_an_aio_client_as_unauthenticated(model, tmp_path):
    """grpc.aio clients used to see INTERNAL in ~3% of denied streams (grpc/grpc#36066: a write that
    fails after the status arrived overwrites it); the server now reads what was sent before ending."""
    f = tmp_path / "tokens.txt"
    add_device(f, "jetson-1")

    async def go():
        codes = collections.Counter()
        async with _server(model, tokens=TokenStore.load(f)) as running, \
                grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = pb_grpc.CollaborativeInferenceStub(ch)
            for i in range(200):
                try:
                    [r async for r in stub.Stream(iter([_good(model, 1), _good(model, 2)]), timeout=10)]
                    codes["ok"] += 1
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code()] += 1
        return codes

    assert asyncio.run(go()) == {grpc.StatusCode.UNAUTHENTICATED: 200}


def test_stream_limit_counts_per_device_token(model, tmp_path):
    f = tmp_path / "tokens.txt"
    tokens = {d: add_device(f, d) for d in ("dev-a", "dev-b")}

    async def go():
        async with _server(model, tokens=TokenStore.load(f), max_streams_per_client=1) as running, \
                grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = pb_grpc.CollaborativeInferenceStub(ch)
            md = {d: (("authorization", f"Bearer {t}"),) for d, t in tokens.items()}
            a = stub.Stream(metadata=md["dev-a"])
            await a.write(_good(model, 1))
            await a.read()
            b = [r.error.code async for r in stub.Stream(iter([_good(model, 2)]), metadata=md["dev-b"])]
            try:
                [r async for r in stub.Stream(iter([_good(model, 3)]), metadata=md["dev-a"])]
                second_a = None
            except grpc.aio.AioRpcError as exc:
                second_a = exc.code()
            await a.done_writing()
            return b, second_a

    b, second_a = asyncio.run(go())
    assert b == [0]  # same address, another device: its own allowance
    assert second_a == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_tampered_bundle_is_refused_before_serving(tmp_path):
    from protos.bundle import BundleError

    b = write_tiny_bundle(tmp_path / "b")
    data = bytearray((b / "cuts" / "c1" / "tail.onnx").read_bytes())
    data[-1] ^= 1
    (b / "cuts" / "c1" / "tail.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        load_model(b, Runtime())


def test_cli_serves_mutual_tls_with_tokens_end_to_end(model, certs, tmp_path):
    from bench.load_bench import ServerProcess

    bundle = write_tiny_bundle(tmp_path / "b")
    tokens = tmp_path / "tokens.txt"
    r = subprocess.run([sys.executable, "-m", "coach_runtime.cli", "cloud", "add-device", "--tokens", str(tokens),
                        "jetson-9"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0
    token = r.stdout.strip()
    assert len(token) >= 40 and token not in tokens.read_text()
    srv = ServerProcess(["--bundle", str(bundle), "--listen", "127.0.0.1:0", "--tls-cert", str(certs / "server.pem"),
                         "--tls-key", str(certs / "server.key"), "--client-ca", str(certs / "ca.pem"),
                         "--tokens", str(tokens)])
    try:
        with grpc.secure_channel(f"localhost:{srv.port}", _creds(certs)) as ch:
            stub = pb_grpc.CollaborativeInferenceStub(ch)
            ok = list(stub.Stream(iter([_good(model, 1), _good(model, 2)]),
                                  metadata=(("authorization", f"Bearer {token}"),), timeout=30))
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Stream(iter([_good(model, 3)]), timeout=30))
    finally:
        assert srv.stop() == 0
    assert [r.request_id for r in ok] == [1, 2] and all(r.error.code == 0 for r in ok)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
