"""Write a plan bundle atomically: build it in a temp directory beside the target, check it with
the loader every consumer uses (protos.bundle.load_bundle), then rename it into place.

    write_bundle(out_dir, doc, files={"full.onnx": ..., "cuts/c1/head.onnx": ...}, force=False)

`doc` is the plan.json document (docs/plan-bundle.md); its file references ({"file", "sha256"})
are filled in here from `files`, so the hashes always match what is written. report.md and
pipeline.png are rendered from the final document.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from coach_runtime.errors import UserError
from partitioner.report import pipeline_png, report_markdown
from protos.bundle import PLAN_FILE, BundleError, load_bundle

log = logging.getLogger(__name__)


def file_ref(relpath: str, data: bytes) -> dict:
    return {"file": relpath, "sha256": hashlib.sha256(data).hexdigest()}


def check_target(out: Path, force: bool) -> None:
    """Refuse to replace an existing non-empty directory (or a file) unless forced."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; pick another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out}: already exists and is not empty; pass --force to replace it")
    if not out.parent.exists():
        raise UserError(f"{out.parent}: no such directory for --out")


def write_bundle(out: str | Path, doc: dict, files: dict[str, bytes], force: bool = False,
                 render: bool = True) -> Path:
    """Write plan.json, `files`, report.md and pipeline.png to `out` (atomically) and return it."""
    out = Path(out).absolute()
    check_target(out, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a bundle is an ordinary directory
        for rel, data in files.items():
            p = tmp / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        text = json.dumps(doc, indent=1, allow_nan=False) + "\n"
        (tmp / PLAN_FILE).write_text(text)
        if render:
            (tmp / "report.md").write_text(report_markdown(doc))
            pipeline_png(doc, tmp / "pipeline.png")
        try:
            load_bundle(tmp)  # the very check edge and cloud will do
        except BundleError as exc:
            raise RuntimeError(f"internal error: the bundle just written does not load: {exc}") from exc
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace_dir(new: Path, out: Path) -> None:
    if not out.exists():
        os.rename(new, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old.rmdir()
    os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
