"""The committed generated modules must match what `make protos` makes from coach.proto now."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO = "protos/coach/v1/coach.proto"


def test_generated_modules_are_fresh(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT), f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", str(ROOT / PROTO)],
        check=True,
    )
    for name in ("coach_pb2.py", "coach_pb2.pyi", "coach_pb2_grpc.py"):
        fresh = (tmp_path / "protos/coach/v1" / name).read_text()
        committed = (ROOT / "protos/coach/v1" / name).read_text()
        assert fresh == committed, f"protos/coach/v1/{name} is stale: run `make protos` and commit"


def test_every_proto_field_is_commented():
    """The proto is the documentation of the wire: each field has a comment on or above it."""
    lines = (ROOT / PROTO).read_text().splitlines()
    for i, line in enumerate(lines):
        s = line.strip()
        is_field = s.endswith(";") and "=" in s and not s.startswith(("//", "syntax", "package", "option"))
        in_enum = s.split("=")[0].strip().isupper()
        if is_field and not in_enum:
            above = lines[i - 1].strip()
            assert "//" in s or above.startswith("//"), f"coach.proto:{i + 1} field without a comment: {s}"
