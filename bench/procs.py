"""Subprocesses for benchmarks: start `coach ...` pinned to cores, wait for its ready line, kill it.

    pin_self({0})                                   # this process (all its threads) on core 0
    cloud = start_cloud(bundle_dir, cores={1})      # `coach cloud serve`, pinned with taskset -c 1
    link = start_link("const:20", cloud.address)    # `coach bench link` in front of it
    ... cloud.address, cloud.rss_kib() ...
    cloud.kill9(); link.stop()

Pinning uses `taskset -c` when it exists (else sched_setaffinity in the child before exec), so a
cloud subprocess and the edge in this process compete for different cores, as on two machines.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
CLOUD_READY = re.compile(r"^serving (.+) on (\S+):(\d+)$")
LINK_READY = re.compile(r"listening on (\S+):(\d+) ->")


def usable_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def pin_self(cores: set[int] | None) -> bool:
    """Pin every thread of this process (and the threads it starts later) to `cores`."""
    if not cores or not hasattr(os, "sched_setaffinity"):
        return False
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except OSError:  # a thread that just ended
            pass
    return True


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def coach_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "coach_runtime.cli", *args]


def pinned(argv: list[str], cores: set[int] | None) -> tuple[list[str], object]:
    """(argv, preexec_fn) that run `argv` on `cores` (unchanged when cores is None)."""
    if not cores:
        return argv, None
    spec = ",".join(str(c) for c in sorted(cores))
    if shutil.which("taskset"):
        return ["taskset", "-c", spec, *argv], None
    return argv, lambda: os.sched_setaffinity(0, cores)



def rss_kib(pid: int) -> int | None:
    """Resident memory of a process (VmRSS from /proc), KiB; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def write_json(path: Path, obj) -> None:
    """Write a results file whole or not at all (temp file, then rename)."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)

class Proc:
    """A subprocess whose stdout and stderr are drained into lists; optionally waits for a ready line."""

    def __init__(self, argv: list[str], cores: set[int] | None = None, ready: re.Pattern | None = None,
                 timeout_s: float = 180.0, env: dict | None = None, name: str = ""):
        self.name = name or Path(argv[0]).name
        argv, preexec = pinned(argv, cores)
        full_env = dict(os.environ, COLUMNS="240", PYTHONUNBUFFERED="1", **(env or {}))
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=full_env, cwd=REPO, preexec_fn=preexec)
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._ready = ready
        self._match: re.Match | None = None
        self._matched = threading.Event()
        threading.Thread(target=self._drain, args=(self.proc.stdout, self.stdout_lines), daemon=True).start()
        threading.Thread(target=self._drain, args=(self.proc.stderr, self.stderr_lines), daemon=True).start()
        if ready is not None:
            self._wait_ready(timeout_s)

    def _drain(self, stream, lines: list[str]) -> None:
        for line in stream:
            line = line.rstrip("\n")
            lines.append(line)
            if self._ready is not None and self._match is None:
                m = self._ready.search(line.strip())
                if m:
                    self._match = m
                    self._matched.set()
        self._matched.set()  # EOF: the process ended (ready or not)

    def _wait_ready(self, timeout_s: float) -> None:
        self._matched.wait(timeout_s)
        if self._match is None:
            self.kill9()
            tail = " | ".join((self.stderr_lines + self.stdout_lines)[-6:])
            raise RuntimeError(f"{self.name} did not become ready in {timeout_s:.0f} s: {tail}")

    @property
    def match(self) -> re.Match | None:
        return self._match

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_kib(self) -> int | None:
        return rss_kib(self.proc.pid)

    def cpu_s(self) -> float | None:
        """CPU time (user + system) the process has used so far, in seconds."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return None

    def kill9(self) -> None:
        """SIGKILL (kill -9): no clean-up, no goodbye on open streams."""
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM, then SIGKILL if it has not ended after `timeout_s`."""
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill9()
            return self.proc.returncode

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class Cloud(Proc):
    """`coach cloud serve` on a bundle; `address` once it says "serving ... on HOST:PORT"."""

    @property
    def address(self) -> str:
        return f"{self.match.group(2)}:{self.match.group(3)}"

    @property
    def port(self) -> int:
        return int(self.match.group(3))


def start_cloud(bundle: str | Path | list, cores: set[int] | None = None, listen: str = "127.0.0.1:0",
                extra: list[str] = (), timeout_s: float = 180.0) -> Cloud:
    """`coach cloud serve` on one bundle directory (or a list of them)."""
    bundles = bundle if isinstance(bundle, (list, tuple)) else [bundle]
    flags = [x for bd in bundles for x in ("--bundle", str(bd))]
    argv = coach_argv("cloud", "serve", *flags, "--listen", listen, *extra)
    return Cloud(argv, cores=cores, ready=CLOUD_READY, timeout_s=timeout_s, name="coach cloud serve")


class Link(Proc):
    """`coach bench link` (the emulator) in front of an upstream; `address` is where clients connect."""

    @property
    def address(self) -> str:
        return f"{self.match.group(1)}:{self.match.group(2)}"


def start_link(up: str, upstream: str, down: str = "const:1000", cores: set[int] | None = None,
               delay_ms: float = 0.0, timeout_s: float = 60.0) -> Link:
    argv = coach_argv("bench", "link", "--up", up, "--down", down, "--listen", "127.0.0.1:0",
                      "--upstream", upstream, "--delay-ms", str(delay_ms), "--report-s", "3600")
    return Link(argv, cores=cores, ready=LINK_READY, timeout_s=timeout_s, name="coach bench link")
