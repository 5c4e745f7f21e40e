"""report.md and pipeline.png of a plan bundle, from the plan.json document alone.

    text = report_markdown(doc)                   # one table per bandwidth level: COACH vs baselines
    pipeline_png(doc, "pipeline.png")              # Gantt of 6 inputs: COACH beside the best baseline
    schedule(edge_ms, transfer_ms, cloud_ms, n=6)  # the three-stage pipeline, start/end per stage

The pipeline has three stages, edge compute -> transfer -> cloud compute, each serving one input at
a time in arrival order: input i enters a stage when it left the previous stage and the stage has
finished input i-1. Inputs arrive every 1/rate (back to back when no rate is given).
"""

from __future__ import annotations

import math

STAGES = ("edge", "link", "cloud")
METHOD_LABELS = {"coach": "COACH", "edge-only": "edge-only", "cloud-only": "cloud-only",
                 "neurosurgeon": "Neurosurgeon", "dads": "DADS", "jalad": "JALAD-like"}


def schedule(edge_ms: float, transfer_ms: float, cloud_ms: float, n: int = 6,
             interval_ms: float = 0.0) -> list[list[tuple[float, float]]]:
    """(start, end) of each stage for inputs 0..n-1: result[i][stage]."""
    durations = (edge_ms, transfer_ms, cloud_ms)
    free = [0.0, 0.0, 0.0]
    out = []
    for i in range(n):
        t = i * interval_ms
        spans = []
        for s, d in enumerate(durations):
            start = max(t, free[s])
            end = start + d
            free[s] = end
            spans.append((start, end))
            t = end
        out.append(spans)
    return out


def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and not math.isfinite(v):
        return "inf"
    return f"{v:.{digits}f}"


def _bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, k in (("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def methods_at(doc: dict, level: int) -> list[tuple[str, dict]]:
    """[(method, row)] at plan-table level `level`: COACH first, then the baselines."""
    out = [("coach", doc["plan_table"][level])]
    for method, rows in doc.get("baselines", {}).items():
        if level < len(rows):
            out.append((method, rows[level]))
    return out


def best_baseline(doc: dict, level: int) -> tuple[str, dict] | None:
    """The baseline with the smallest period (then latency) at a level."""
    rows = methods_at(doc, level)[1:]
    if not rows:
        return None
    return min(rows, key=lambda mr: (mr[1]["period_ms"], mr[1]["latency_ms"]))


def reference_level(doc: dict) -> int:
    """The plan-table level the Gantt chart shows: the median level."""
    return (len(doc["plan_table"]) - 1) // 2


def report_markdown(doc: dict) -> str:
    m, obj = doc["model"], doc["objective"]
    prof = doc.get("profiles", {})
    lines = [f"# COACH plan: {m['name']}", ""]
    edge, cloud = prof.get("edge", {}), prof.get("cloud", {})
    rate = obj.get("rate_hz")
    goal = f"latency subject to period <= 1/rate at {_fmt(rate)} Hz" if rate else "minimum period, then latency"
    lines += [
        f"- model sha256: `{m['sha256']}`",
        f"- edge device: {edge.get('device', {}).get('name', '?')}{_scale_note(edge)}; "
        f"cloud device: {cloud.get('device', {}).get('name', '?')}",
        f"- objective: {goal}; accuracy budget {_fmt(obj['accuracy_budget'])} points of top-1 agreement",
        f"- accuracy: {obj.get('accuracy', '?')}; bit widths offered: "
        f"{', '.join(map(str, obj.get('bits_options', [])))}",
        f"- search: {obj.get('search_mode', '?')}, {obj.get('candidates', '?')} frontier cuts, "
        f"{obj.get('accuracy_evaluations', 0)} accuracy measurements",
        f"- link overhead per message: {_fmt(obj.get('link_overhead_ms', 0.0))} ms; "
        f"bandwidth levels from {obj.get('bandwidth_source', '?')}",
    ]
    for note in doc.get("notes", []):
        lines.append(f"- note: {note}")
    lines.append("")
    cuts = {c["id"]: c for c in doc["cuts"]}
    lines += ["## Plans per bandwidth level", "",
              "Times in ms; bubble = 1 - (T_e + T_t + T_c) / (3 period); drop in points of top-1 "
              "agreement with the fp32 model (n/a: not measured).", ""]
    header = ("| method | cut | bits | T_e | T_t | T_c | latency | period | bubble | drop | bytes sent |\n"
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for level, row in enumerate(doc["plan_table"]):
        lines += [f"### {row['bandwidth_mbps']:g} Mbit/s", "", header]
        for method, r in methods_at(doc, level):
            cut = cuts.get(r["cut"], {})
            name = r["cut"] if cut.get("kind") == "interior" else cut.get("kind", r["cut"])
            lines.append(
                f"| {METHOD_LABELS.get(method, method)} | {name} | {r['bits']} | {_fmt(r['edge_ms'])} | "
                f"{_fmt(r['transfer_ms'])} | {_fmt(r['cloud_ms'])} | {_fmt(r['latency_ms'])} | "
                f"{_fmt(r['period_ms'])} | {_fmt(r['bubble_ratio'], 3)} | {_fmt(r.get('accuracy_drop'))} | "
                f"{_bytes(r.get('bytes'))} |")
        lines.append("")
    lines += ["## Cuts in this bundle", "",
              "| cut | kind | edge nodes | tensors | elements | min bits | predicted head / tail ms | "
              "measured here head / tail ms | split error |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for c in doc["cuts"]:
        v = c.get("validation", {})
        tensors = ", ".join(f"`{t['name']}` {t['shape']}" for t in c["tensors"][:3])
        if len(c["tensors"]) > 3:
            tensors += f" (+{len(c['tensors']) - 3})"
        admissible = [q["bits"] for q in c["quantization"] if q["admissible"]]
        lines.append(
            f"| {c['id']} | {c['kind']} | {c.get('edge_nodes', 0)} | {tensors or '-'} | {c.get('elements', 0)} | "
            f"{min(admissible) if admissible else '-'} | {_fmt(c['predicted']['edge_ms'])} / "
            f"{_fmt(c['predicted']['cloud_ms'])} | {_fmt(v.get('head_ms'))} / {_fmt(v.get('tail_ms'))} | "
            f"{v.get('max_relative_error', 0.0):.1e} |")
    lines += ["", "Measured here: the extracted head and tail timed on the planning machine with "
              "onnxruntime (comparable to the predictions only when a profile was measured here).", ""]
    lines += ["## Quantization tables", ""]
    for c in doc["cuts"]:
        if not c["quantization"]:
            continue
        cells = ", ".join(
            f"{q['bits']}b: {_bytes(q['bytes'])}, drop {_fmt(q.get('accuracy_drop'))}"
            + ("" if q["admissible"] else " (over budget)")
            for q in c["quantization"])
        lines.append(f"- {c['id']}: {cells}")
    lines += cache_markdown(doc)
    lines += ["", "![pipeline](pipeline.png)", ""]
    return "\n".join(lines)


def cache_markdown(doc: dict) -> list[str]:
    """The semantic-cache section: per cut, the calibrated thresholds and what they did on held-out data."""
    cache = doc.get("cache")
    status = doc["objective"].get("semantic_cache", "none")
    lines = ["", "## Semantic cache", ""]
    if not cache:
        return lines + [f"No semantic cache in this bundle: {status.removeprefix('none: ')}."]
    lines += [f"{status[:1].upper()}{status[1:]}. Margin = top-1 minus top-2 cosine similarity of the "
              f"pooled cut feature (`{cache['pooling']}`) to the label centers; at or above the hit "
              "threshold the edge answers from the cache and sends nothing; in the band it sends at the "
              "band's bits; below, at the plan's bits. Rates, precision (agreement of cache answers "
              "with the full model) and drop (points of top-1 agreement, over all held-out samples) "
              "measured on the held-out samples.", "",
              "| cut | hit threshold | hit rate | precision | normal bits | band bits | band threshold | "
              "band rate | band drop | held-out | classes | dim |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for cid, e in cache["cuts"].items():
        lines.append(
            f"| {cid} | {_fmt(e['hit'], 3)} | {_pct(e['hit_rate'])} | {_pct(e['precision'])} | "
            f"{e.get('normal_bits', 'n/a')} | {e['band_bits'] if e['band_bits'] is not None else '-'} | "
            f"{_fmt(e['band'], 3)} | {_pct(e['band_rate'])} | {_fmt(e['band_drop'])} | {e['held_out']} | "
            f"{e['num_classes']} | {e['dim']} |")
    lines += ["", "n/a threshold: no margin threshold reached the target precision on held-out data "
              "(the cache never answers for that cut); band -: no band (no width below the normal one, or "
              "none within the accuracy budget the normal width leaves)."]
    return lines


def _pct(v) -> str:
    return "n/a" if v is None else f"{100.0 * v:.1f}%"


def _scale_note(p: dict) -> str:
    dev = p.get("device", {})
    if "scale" in dev:
        return f" (profile of {dev.get('scaled_from', '?')} scaled by {dev['scale']:g})"
    return ""


def pipeline_png(doc: dict, path, n: int = 6) -> None:
    """Gantt chart of `n` consecutive inputs through edge, link and cloud at the reference level:
    COACH on top, the best baseline below, on the same time axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    level = reference_level(doc)
    panels = [("coach", doc["plan_table"][level])]
    best = best_baseline(doc, level)
    if best is not None:
        panels.append(best)
    rate = doc["objective"].get("rate_hz")
    interval = 1000.0 / rate if rate else 0.0
    scheds = [schedule(r["edge_ms"], r["transfer_ms"], r["cloud_ms"], n, interval) for _, r in panels]
    horizon = max((s[-1][2][1] for s in scheds), default=1.0) or 1.0
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 1.9 * len(panels) + 0.8), sharex=True, squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, (method, row), sched in zip(axes[:, 0], panels, scheds):
        for i, spans in enumerate(sched):
            for s, (a, b) in enumerate(spans):
                if b > a:
                    ax.broken_barh([(a, b - a)], (2 - s - 0.4, 0.8), facecolors=colors(i % 10),
                                   edgecolor="black", linewidth=0.5)
                    if b - a > horizon / 40:
                        ax.text((a + b) / 2, 2 - s, str(i), ha="center", va="center", fontsize=8)
        ax.set_yticks([2, 1, 0], STAGES)
        ax.set_title(f"{METHOD_LABELS.get(method, method)}: cut {row['cut']}, {row['bits']} bits, "
                     f"period {row['period_ms']:.1f} ms, latency {row['latency_ms']:.1f} ms, "
                     f"bubble {row['bubble_ratio']:.2f}", fontsize=9)
        ax.set_xlim(0, horizon * 1.02)
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel(f"time (ms) at {doc['plan_table'][level]['bandwidth_mbps']:g} Mbit/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
