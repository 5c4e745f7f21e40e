"""`coach bench e2e`: COACH against the baselines, end to end, on real uplink traces.

For each trace and each method the same inputs go through a real cloud process (`coach cloud serve`,
pinned to its own core) behind the link emulator replaying the trace (restarted per method, so every
method sees the same stretch of the trace), from an in-process edge agent pinned to another core.
Methods: COACH (adaptive bits + plan cut switching + semantic cache), COACH without the cache, and the
bundle's baselines (Neurosurgeon, DADS, JALAD-like, edge-only, cloud-only) following their own plan
tables. Figures per method: accuracy, p50/p95/mean latency, throughput, bubble ratio, bytes sent,
cache hit rate. Writes a report directory: table.md, results.json, latency CDFs, and the trace with the
bits and cut COACH chose over time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coach_runtime.errors import UserError
from edge.adapt import BITS_RULES, DEFAULT_BITS_RULE

METHODS = ("coach", "coach-no-cache", "neurosurgeon", "dads", "jalad", "edge-only", "cloud-only")
LABELS = {"coach": "COACH", "coach-no-cache": "COACH w/o cache", "neurosurgeon": "Neurosurgeon", "dads": "DADS",
          "jalad": "JALAD-like", "edge-only": "edge-only", "cloud-only": "cloud-only"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, type=Path, help="plan bundle (from `coach plan`)")
    p.add_argument("--traces", nargs="+", required=True, help="uplink traces (mahimahi files or const:MBPS)")
    p.add_argument("--source", required=True, help="inputs, as for `coach edge run --source`")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--inputs", type=int, default=200, help="inputs per method (default 200)")
    p.add_argument("--seconds", type=float, default=30.0, help="at most this long per method (default 30)")
    p.add_argument("--down", default="const:50", help="downlink trace (default const:50)")
    p.add_argument("--delay-ms", type=float, default=10.0, help="one-way link delay (default 10)")
    p.add_argument("--agreement", action="store_true",
                   help="inputs without labels: score top-1 agreement with the fp32 full model instead")
    p.add_argument("--edge-slowdown", type=float, default=1.0,
                   help="stretch edge compute by this factor (use the one the bundle was planned with)")
    p.add_argument("--bits-rule", choices=BITS_RULES, default=DEFAULT_BITS_RULE,
                   help="COACH's choice among the bit widths that keep up (as `coach edge run --bits-rule`)")
    p.add_argument("--out", type=Path, default=Path("bench/results/e2e"), help="report directory")


@dataclass
class MethodRun:
    trace: str
    method: str
    results: list  # edge.agent.Result
    done_at: list[float]  # completion time of each result, s since the run started
    bw: list[float | None]  # bandwidth estimate at each result
    wall_s: float
    stats: dict
    cache: dict


def pin(pid: int, cores: set[int]) -> None:
    """Pin every thread of a process (a process's later threads inherit it from the one that makes them)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except OSError:
            pass


def with_reference_labels(samples, full_path: Path):
    """Label each unlabelled input with the fp32 full model's top-1 (accuracy = agreement with it)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(full_path), providers=["CPUExecutionProvider"])
    for s in samples:
        if s.label is None:
            s.label = int(np.argmax(session.run(None, s.inputs)[0]))
        yield s


def run_method(bundle, cloud_port: int, trace: str, method: str, source: str, n: int, seconds: float,
               down: str, delay_ms: float, edge_slowdown: float = 1.0, agreement: bool = False,
               link_cores: set[int] | None = None, bits_rule: str = DEFAULT_BITS_RULE) -> MethodRun:
    """One method on one trace. The link emulator is a process of its own (`coach bench link`, on
    `link_cores`: the cloud's core), started afresh so that every method sees the same stretch of the
    trace; in the edge's process its packet timers would take the edge's core and lock."""
    from bench.procs import start_link
    from edge.agent import Agent, AgentConfig
    from edge.sources import open_source

    emu = start_link(trace, f"127.0.0.1:{cloud_port}", down, cores=link_cores, delay_ms=delay_ms)
    try:
        plan = "coach" if method.startswith("coach") else method
        cfg = AgentConfig(cloud=emu.address, plan=plan, cache=method == "coach", deadline_ms=20000,
                          edge_slowdown=edge_slowdown, bits_rule=bits_rule)
        agent = Agent(bundle, cfg)
        samples = itertools.islice(open_source(source, agent.inputs), n)
        if agreement:  # labelled before the clock starts: the reference model's time is not the run's
            samples = list(with_reference_labels(samples, bundle.full_path))
        results, done_at, bw = [], [], []
        t0 = time.perf_counter()
        with agent:
            for r in agent.run(_until(samples, t0 + seconds)):
                results.append(r)
                done_at.append(time.perf_counter() - t0)
                bw.append(agent.estimator.estimate_mbps())
            wall = time.perf_counter() - t0
            cache = agent.cache_telemetry()
        return MethodRun(trace, method, results, done_at, bw, wall, dict(agent.stats), cache)
    finally:
        emu.stop()


def _until(samples, deadline: float):
    for s in samples:
        if time.perf_counter() > deadline:
            return
        yield s


def summarize(run: MethodRun) -> dict:
    rs = run.results
    lat = np.array([r.timing["total_ms"] for r in rs]) if rs else np.zeros(1)
    labelled = [r for r in rs if r.label is not None]
    busy = {k: sum(r.timing.get(k, 0.0) for r in rs) / 1e3 for k in ("edge_ms", "wire_ms", "cloud_ms")}
    wall = run.done_at[-1] if run.done_at else run.wall_s
    # Steady-state throughput: results over the time after the first tenth of them came back.
    k = len(rs) // 10
    thr = (len(rs) - k - 1) / (run.done_at[-1] - run.done_at[k]) if len(rs) > k + 2 else len(rs) / max(wall, 1e-9)
    return {
        "trace": run.trace, "method": run.method, "inputs": len(rs),
        "accuracy": (sum(r.cls == r.label for r in labelled) / len(labelled)) if labelled else None,
        "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)), "mean_ms": float(lat.mean()),
        "throughput_hz": thr,
        "bubble_ratio": max(0.0, 1 - sum(busy.values()) / (3 * wall)) if wall > 0 else None,
        "bytes_sent": sum(run.stats.get(k, 0) for k in ("bytes", "verify_bytes", "probe_bytes")),
        "probe_bytes": run.stats.get("probe_bytes", 0), "cache_hit_rate": run.cache.get("hit_rate"),
        "where": {w: sum(r.where == w for r in rs) for w in ("cloud", "edge", "cache")},
        "bits_used": sorted({r.bits for r in rs if r.bits is not None}),
        "cuts_used": sorted({r.cut for r in rs}),
    }


def markdown_table(rows: list[dict]) -> str:
    head = ("| trace | method | accuracy | p50 ms | p95 ms | mean ms | throughput /s | bubble ratio | bytes sent "
            "| cache hits |\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%"
        hit = "-" if r["cache_hit_rate"] is None else f"{100 * r['cache_hit_rate']:.0f}%"
        lines.append(f"| {Path(r['trace']).name} | {LABELS.get(r['method'], r['method'])} | {acc} | {r['p50_ms']:.1f} | "
                     f"{r['p95_ms']:.1f} | {r['mean_ms']:.1f} | {r['throughput_hz']:.2f} | {r['bubble_ratio']:.2f} | "
                     f"{r['bytes_sent']} | {hit} |")
    return head + "\n".join(lines) + "\n"


def comparisons(rows: list[dict]) -> list[dict]:
    """COACH vs Neurosurgeon (and vs every baseline) per trace: the issue's ratios."""
    out = []
    for trace in dict.fromkeys(r["trace"] for r in rows):
        by = {r["method"]: r for r in rows if r["trace"] == trace}
        c = by.get("coach")
        if c is None:
            continue
        ns = by.get("neurosurgeon")
        entry = {"trace": trace}
        if ns:
            entry["throughput_vs_neurosurgeon"] = c["throughput_hz"] / ns["throughput_hz"] if ns["throughput_hz"] else None
            entry["mean_latency_vs_neurosurgeon"] = c["mean_ms"] / ns["mean_ms"] if ns["mean_ms"] else None
        base = [m for m in by if m not in ("coach", "coach-no-cache")]
        entry["ahead_on_throughput_of"] = [m for m in base if c["throughput_hz"] > by[m]["throughput_hz"]]
        entry["behind_on_throughput"] = [m for m in base if c["throughput_hz"] < by[m]["throughput_hz"]]
        entry["behind_on_mean_latency"] = [m for m in base if c["mean_ms"] > by[m]["mean_ms"]]
        full = [r for r in rows if r["trace"] == trace and r["accuracy"] is not None]
        if c["accuracy"] is not None and full:
            entry["accuracy_drop_vs_best_points"] = 100 * (max(r["accuracy"] for r in full) - c["accuracy"])
        out.append(entry)
    return out


def plots(runs: list[MethodRun], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.mahimahi import load_trace, windowed_capacity

    files = []
    for trace in dict.fromkeys(r.trace for r in runs):
        name = Path(trace).name
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in (x for x in runs if x.trace == trace):
            lat = np.sort([x.timing["total_ms"] for x in r.results])
            if lat.size:
                ax.plot(lat, np.arange(1, lat.size + 1) / lat.size, label=LABELS.get(r.method, r.method))
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("fraction of inputs")
        ax.set_title(f"latency CDF, {name}")
        ax.legend(fontsize=8)
        f = out / f"latency_cdf_{name}.png"
        fig.tight_layout()
        fig.savefig(f, dpi=110)
        plt.close(fig)
        files.append(f.name)
        coach = next((x for x in runs if x.trace == trace and x.method == "coach"), None)
        if coach is None or not coach.results:
            continue
        t_end = max(coach.done_at[-1], 1.0)
        tr = load_trace(trace)
        cap = windowed_capacity(tr, 500.0, t_end * 1e3)
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
        a1.step(np.arange(len(cap)) * 0.5, cap, where="post", label="trace capacity (0.5 s windows)")
        est = [(t, b) for t, b in zip(coach.done_at, coach.bw) if b is not None]
        if est:
            a1.plot(*zip(*est), ".", ms=3, label="edge estimate")
        # the first estimates, from a handful of bytes, can read 100x the link: keep the trace readable
        top = max(float(np.max(cap)) if len(cap) else 0.0, np.percentile([b for _, b in est], 95) if est else 0.0)
        a1.set_ylim(0, 1.2 * max(top, 1.0))
        a1.set_ylabel("Mbit/s")
        a1.legend(fontsize=8)
        cuts = sorted({x.cut for x in coach.results})
        bits = [x.bits if x.bits is not None else 0 for x in coach.results]
        a2.plot(coach.done_at, bits, ".", ms=3, label="bits (0: no transfer)")
        a2.set_ylabel("bits")
        a3 = a2.twinx()
        a3.plot(coach.done_at, [cuts.index(x.cut) for x in coach.results], "r.", ms=2, alpha=0.4)
        a3.set_yticks(range(len(cuts)), [c.replace("cut-", "") for c in cuts], fontsize=6)
        a2.set_xlabel("time (s)")
        a1.set_title(f"COACH on {name}: bandwidth, bits (blue) and cut (red) over time")
        f = out / f"coach_over_time_{name}.png"
        fig.tight_layout()
        fig.savefig(f, dpi=110)
        plt.close(fig)
        files.append(f.name)
    return files


def evaluate(bundle: Path, traces: list[str], source: str, methods: list[str], n: int, seconds: float,
             down: str, delay_ms: float, out: Path, progress=None, edge_slowdown: float = 1.0,
             agreement: bool = False, bits_rule: str = DEFAULT_BITS_RULE) -> dict:
    from bench.load_bench import ServerProcess
    from protos.bundle import load_bundle

    b = load_bundle(bundle)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"--methods: unknown {unknown}; use {', '.join(METHODS)}")
    two_cores = len(os.sched_getaffinity(0)) >= 2
    srv = ServerProcess(["--bundle", str(bundle), "--listen", "127.0.0.1:0", "--compute-workers", "1",
                         "--intra-op-threads", "1"])
    runs, rows = [], []
    try:
        if two_cores:
            pin(srv.proc.pid, {1})
            os.sched_setaffinity(0, {0})
        for trace in traces:
            for method in methods:
                if progress:
                    progress(trace, method)
                run = run_method(b, srv.port, trace, method, source, n, seconds, down, delay_ms, edge_slowdown,
                                 agreement, link_cores={1} if two_cores else None, bits_rule=bits_rule)
                runs.append(run)
                rows.append(summarize(run))
    finally:
        srv.proc.terminate()
        srv.proc.wait(30)
        if two_cores:
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    result = {"bundle": str(bundle), "model": b.model_name, "plan_sha256": b.plan_sha256, "source": source,
              "traces": traces, "methods": methods, "pinned_cores": two_cores, "edge_slowdown": edge_slowdown,
              "bits_rule": bits_rule,
              "accuracy_is": "agreement with the fp32 model" if agreement else "against the source's labels", "rows": rows,
              "comparisons": comparisons(rows), "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"}
    result["plots"] = plots(runs, tmp)
    (tmp / "table.md").write_text(markdown_table(rows))
    (tmp / "results.json").write_text(json.dumps(result, indent=2))
    gantt = b.path / "pipeline.png"
    if gantt.exists():
        (tmp / "pipeline.png").write_bytes(gantt.read_bytes())
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return result


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for trace in result["traces"]:
        t = Table(title=f"{result['model']} on {Path(trace).name}")
        for col in ("method", "accuracy", "p50 ms", "p95 ms", "mean ms", "throughput /s", "bubble", "bytes sent",
                    "cache hits"):
            t.add_column(col, justify="right")
        for r in (x for x in result["rows"] if x["trace"] == trace):
            t.add_row(LABELS.get(r["method"], r["method"]),
                      "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%",
                      f"{r['p50_ms']:.1f}", f"{r['p95_ms']:.1f}", f"{r['mean_ms']:.1f}", f"{r['throughput_hz']:.2f}",
                      f"{r['bubble_ratio']:.2f}",
                      str(r["bytes_sent"]), "-" if r["cache_hit_rate"] is None else f"{100 * r['cache_hit_rate']:.0f}%")
        console.print(t)
    for c in result["comparisons"]:
        console.print(f"[bold]{Path(c['trace']).name}[/]: COACH throughput x{c.get('throughput_vs_neurosurgeon') or 0:.2f} "
                      f"of Neurosurgeon, mean latency x{c.get('mean_latency_vs_neurosurgeon') or 0:.2f}; behind on "
                      f"throughput: {c['behind_on_throughput'] or 'none'}; behind on mean latency: "
                      f"{c['behind_on_mean_latency'] or 'none'}")


def run(args) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for t in args.traces:
        if not t.startswith("const:") and not Path(t).exists():
            raise UserError(f"trace {t}: no such file (a mahimahi trace, or const:MBPS)")

    def progress(trace, method):
        print(f"  running {LABELS.get(method, method)} on {Path(trace).name} ...", flush=True)

    result = evaluate(args.bundle, args.traces, args.source, methods, args.inputs, args.seconds, args.down,
                      args.delay_ms, args.out, progress, args.edge_slowdown, args.agreement, args.bits_rule)
    print_table(result)
    print(f"report: {args.out}/table.md, results.json, {', '.join(result['plots'])}")
    return 0
