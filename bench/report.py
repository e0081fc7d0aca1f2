"""Fold the repeats of each (target, shape) into medians and print the table with the ratios ours/bare, ours/Infinity.

A target that could not run keeps its row, marked 'unavailable: reason'.
"""

from __future__ import annotations

import statistics

COS_FLOOR = 0.999


def fold(runs: list[dict]) -> dict:
    """Median sentences/s and latencies over repeats; the worst cosine; all errors."""
    return {"sent_per_s": statistics.median(r["sent_per_s"] for r in runs),
            "p50_ms": statistics.median(r["p50_ms"] for r in runs),
            "p99_ms": statistics.median(r["p99_ms"] for r in runs),
            "min_cos": min(r["min_cos"] for r in runs), "errors": sum(r["errors"] for r in runs),
            "server_cores": statistics.median(r.get("server_cores", 0.0) for r in runs),
            "foreign_cores": max(r.get("foreign_cores", 0.0) for r in runs), "repeats": len(runs),
            # each repeat against the ceiling measured beside it (run.measure), where it was
            "ceiling_fraction": statistics.median(r["sent_per_s"] / r["ceiling_beside"] for r in beside)
            if (beside := [r for r in runs if r.get("ceiling_beside")]) else None}


def summary(rows: dict[str, dict]) -> dict[str, dict]:
    """{target: {shape: folded}} for the targets that ran."""
    return {name: {shape: fold(runs) for shape, runs in row["runs"].items() if runs}
            for name, row in rows.items() if row.get("runs")}


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def table(rows: dict[str, dict], shapes: list[str], ceiling: float | None = None) -> tuple[str, list[str]]:
    """The printed table, and the list of cosine failures (empty when every response matched the bare model)."""
    folded = summary(rows)
    head = f"{'target':<20} {'c1 s/s':>8} {'p50 ms':>7} {'p99 ms':>7}"
    rest = [s for s in shapes if s != "c1"]
    head += "".join(f" {s + ' s/s':>11}" for s in rest) + f" {'min cos':>9} {'errors':>6}"
    lines, failures = [head, "-" * len(head)], []
    for name, row in rows.items():
        if row.get("unavailable"):
            lines.append(f"{name:<20} unavailable: {row['unavailable']}")
            continue
        got = folded.get(name, {})
        c1 = got.get("c1")
        line = f"{name:<20} " + (f"{c1['sent_per_s']:8.1f} {c1['p50_ms']:7.1f} {c1['p99_ms']:7.1f}" if c1 else
                                 f"{'-':>8} {'-':>7} {'-':>7}")
        line += "".join(f" {got[s]['sent_per_s']:11.1f}" if s in got else f" {'-':>11}" for s in rest)
        cos = min((v["min_cos"] for v in got.values()), default=float("nan"))
        line += f" {cos:9.6f} {sum(v['errors'] for v in got.values()):6d}"
        lines.append(line)
        failures += [f"{name} {s}: min cosine {v['min_cos']:.6f} < {COS_FLOOR}" for s, v in got.items()
                     if not v["min_cos"] >= COS_FLOOR]
    lines += ratio_lines(folded, shapes, ceiling)
    return "\n".join(lines), failures


def ratio_lines(folded: dict[str, dict], shapes: list[str], ceiling: float | None = None) -> list[str]:
    """Ours against the bare model, against Infinity's best engine at each shape (c1: p50 against its lowest p50),
    and against the compute ceiling (ceiling.py)."""
    ours, bare = folded.get("ours", {}), folded.get("bare", {})
    infinity = [v for k, v in folded.items() if k.startswith("infinity")]
    best = {s: max((v[s]["sent_per_s"] for v in infinity if s in v), default=None) for s in shapes}
    lowest_p50 = min((v["c1"]["p50_ms"] for v in infinity if "c1" in v), default=None)
    out = ["-" * 20]

    def row(label: str, other: dict[str, float | None], c1_extra: str) -> str:
        vals = {s: _ratio(ours.get(s, {}).get("sent_per_s"), other.get(s)) for s in shapes}
        return (f"{label:<20} {vals.get('c1', ''):>8} {c1_extra:>15}"
                + "".join(f" {vals[s]:>11}" for s in shapes if s != "c1"))

    if ours and bare:
        p50 = (f"p50 {ours['c1']['p50_ms'] - bare['c1']['p50_ms']:+.1f} ms"
               if "c1" in ours and "c1" in bare else "")
        out.append(row("ours/bare", {s: bare.get(s, {}).get("sent_per_s") for s in shapes}, p50))
    if ours and infinity:
        p50 = f"p50 {_ratio(ours['c1']['p50_ms'], lowest_p50)}" if "c1" in ours and lowest_p50 else ""
        out.append(row("ours/inf-best", best, p50))
    if ours and ceiling:
        out.append(row("ours/ceiling", dict.fromkeys(shapes, ceiling), f"({ceiling:.0f} s/s)"))
    paired = {s: ours[s]["ceiling_fraction"] for s in shapes if ours.get(s, {}).get("ceiling_fraction") is not None}
    if paired:
        cells = {s: f"{paired[s]:.2f}" if s in paired else "-" for s in shapes}
        out.append(f"{'ours/ceiling beside':<20} {cells.get('c1', ''):>8} {'(each repeat)':>15}"
                   + "".join(f" {cells[s]:>11}" for s in shapes if s != "c1"))
    return out


def latency_table(rows: dict[str, dict], shapes: list[str]) -> str:
    """p50/p99 of each server at each shape (a request: one sentence, or 32 or 256 in the batched shapes)."""
    folded = summary(rows)
    head = f"{'target':<20}" + "".join(f" {s:>15}" for s in shapes)
    lines = [head, "-" * len(head)]
    for name, got in folded.items():
        if name == "bare":
            continue
        lines.append(f"{name:<20}" + "".join(
            f" {got[s]['p50_ms']:7.1f}/{got[s]['p99_ms']:<7.1f}" if s in got else f" {'-':>15}" for s in shapes))
    return "\n".join(lines)


def cpu_lines(rows: dict[str, dict], shapes: list[str]) -> str:
    """Cores used by each server's process tree during each shape, and the most other tenants used meanwhile."""
    folded = summary(rows)
    lines = [f"{'server cores':<20}" + "".join(f" {s:>11}" for s in shapes)]
    for name, got in folded.items():
        if name == "bare":
            continue
        lines.append(f"{name:<20}" + "".join(f" {got[s]['server_cores']:11.2f}" if s in got else f" {'-':>11}"
                                             for s in shapes))
    foreign = max((v["foreign_cores"] for got in folded.values() for v in got.values()), default=0.0)
    lines.append(f"most cores used by other tenants during any measurement: {foreign:.2f}")
    return "\n".join(lines)


def _verdict(value: float | None, target: float | None) -> str:
    if target is None:
        return ""
    if value is None:
        return "n/a"
    return "PASS" if value <= target else "FAIL"


def memory_table(memory: dict[str, dict], targets_mib: dict[str, float]) -> str:
    """Each server's process tree (the server and every descendant) after the last load shape."""
    head = f"{'server':<20} {'tree PSS MiB':>12} {'tree RSS MiB':>12} {'processes':>9}  {'target PSS':>10}"
    lines = [head, "-" * len(head)]
    for name, m in memory.items():
        if m.get("error"):
            lines.append(f"{name:<20} {m['error']}")
            continue
        target = targets_mib.get(name)
        lines.append(f"{name:<20} {m['pss_mib']:12.0f} {m['rss_mib']:12.0f} {m['processes']:9d}  "
                     + (f"{'<= ' + format(target, '.0f'):>10} {_verdict(m['pss_mib'], target)}" if target else ""))
    return "\n".join(lines)


def startup_table(timings: list[dict]) -> str:
    """Seconds to the first embedding: median, min and max over the starts (or reloads) that answered."""
    head = f"{'server':<20} {'what':<32} {'runs':>4} {'median s':>8} {'min s':>6} {'max s':>6}  {'target':>8}"
    lines = [head, "-" * len(head)]
    for t in timings:
        got = t["seconds"]
        line = f"{t['server']:<20} {t['what']:<32} {len(got):>4} "
        line += (f"{t['median_s']:8.2f} {min(got):6.2f} {max(got):6.2f}" if got else f"{'-':>8} {'-':>6} {'-':>6}")
        if t["target_s"] is not None:
            line += f"  {'<= ' + format(t['target_s'], 'g') + ' s':>8} {_verdict(t['median_s'], t['target_s'])}"
        if t["errors"]:
            line += f"  {len(t['errors'])} failed: {t['errors'][0][:120]}"
        if t["note"]:
            line += f"  ({t['note']})"
        lines.append(line)
    return "\n".join(lines)
