"""`coach demo`: the main job end to end on an embedded default, localhost only.

Until the full pipeline demo lands, this runs a real round trip: it starts the cloud service on
localhost, sends quantized tensors over the bidirectional Stream, and prints what came back.
"""

from __future__ import annotations

import argparse
import asyncio

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", type=int, nargs="+", default=[32, 16, 8, 4, 2], help="bit widths to send")


async def _round_trip(bits_list: list[int]) -> list[dict]:
    import grpc

    from cloud.server import start_server
    from protos import codec
    from protos.coach.v1 import coach_pb2 as pb
    from protos.coach.v1 import coach_pb2_grpc as pb_grpc

    x = np.maximum(np.random.default_rng(0).standard_normal((1, 64, 28, 28)), 0).astype(np.float32)
    server, port, _ = await start_server()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.CollaborativeInferenceStub(channel)
            reqs = [pb.InferRequest(request_id=i, model="echo", tensors=[codec.encode(x, b, name="cut")],
                                    return_outputs=True) for i, b in enumerate(bits_list)]
            rows = []
            async for r in stub.Stream(iter(reqs)):
                if r.error.code:
                    raise RuntimeError(r.error.message)
                y = codec.decode(r.outputs[0])
                b = bits_list[r.request_id]
                rows.append({"bits": b, "wire_bytes": len(reqs[r.request_id].tensors[0].data),
                             "max_abs_err": float(np.abs(y - x).max()), "port": port,
                             "decode_ms": r.timing.decode_ms})
            return rows
    finally:
        await server.stop(grace=1)


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    rows = asyncio.run(_round_trip(args.bits))
    table = Table(title=f"coach demo: echo round trip over gRPC Stream on 127.0.0.1:{rows[0]['port']}, 1x64x28x28 tensor")
    for col in ("bits", "bytes on the wire", "max |error|", "server decode ms"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["bits"]), str(r["wire_bytes"]), f"{r['max_abs_err']:.4g}", f"{r['decode_ms']:.3f}")
    Console().print(table)
    return 0
