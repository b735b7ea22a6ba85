"""
The report of a cleaning run: documents in / out and removals per stage, seconds, peak memory; the shards'
reports as one; the lines the command prints.
"""
import resource

import numpy as np

from clean_data import filters
from clean_data.decide import DUP_REASON, STAGES


def peak_rss_mb():
    """Peak resident memory of this process and of its (finished) children, in MiB (Linux: KiB units)."""
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return round(me, 1), round(kids, 1)


def stage_counts(walk, code, filt, empty, secs):
    """Per stage: documents in / out / removed (by reason), seconds and docs/s, for this shard's documents."""
    out, alive = {}, np.ones(len(code), bool)
    for k, s in enumerate(walk):
        stage_code = 1 + STAGES.index(s)
        entering = alive & ~empty if s in ("minhash", "simhash") else alive
        gone = code == stage_code
        if s == "filter":
            by = {filters.FILTER_NAMES[r - 1]: int(n) for r, n in zip(*np.unique(filt[gone], return_counts=True))}
        else:
            by = {DUP_REASON[s]: int(gone.sum())} if gone.any() else {}
        n_in, n_gone = int(entering.sum()), int(gone.sum())
        out[s] = {"in": n_in, "out": n_in - n_gone, "removed": n_gone, "removed_by": by,
                  "seconds": round(secs[s], 3), "docs_per_s": round(n_in / secs[s]) if secs[s] > 0 else None}
        alive &= ~gone
    return out


def combine_reports(reports):
    """The shards' reports as one: documents and characters summed, stage counts and seconds summed, the
    largest peak RSS; shards: the shard reports themselves."""
    first = reports[0]
    out = {k: sum(r[k] for r in reports) for k in ("documents_in", "documents_out", "chars_in", "chars_out")}
    stages = {}
    for s in first["stages"]:
        v = {k: sum(r["stages"][s][k] for r in reports) for k in ("in", "out", "removed", "seconds")}
        v["removed_by"] = {}
        for r in reports:
            for reason, n in r["stages"][s]["removed_by"].items():
                v["removed_by"][reason] = v["removed_by"].get(reason, 0) + n
        stages[s] = v
    out["stages"] = stages
    out["peak_rss_mb_max"] = max(max(r["peak_rss_mb"].values()) for r in reports)
    out["wall_seconds_max"] = max(r["seconds"]["wall"] for r in reports)
    out["shards"] = reports
    return out


def format_report(r):
    """The report dict clean() returns as the lines the command prints (no trailing newline)."""
    lines = [f"documents {r['documents_in']:,} -> {r['documents_out']:,}, characters {r['chars_in']:,} -> "
             f"{r['chars_out']:,}, {r['seconds']['wall']} s ({r['docs_per_s_wall']:,} docs/s)"]
    for s, v in r["stages"].items():
        lines.append(f"  {s:8s} in {v['in']:>9,}  removed {v['removed']:>8,}  {v['seconds']:7.1f} s  "
                     f"{v['docs_per_s'] or 0:>9,} docs/s  {v['removed_by']}")
    rss = r["peak_rss_mb"]
    lines.append(f"  peak RSS: main {rss['main']} MiB, largest worker {rss['largest_worker']} MiB; "
                 f"{r['bytes_per_document']} bytes of arrays per document")
    e = r["read_errors"]
    if e["malformed_records"]:
        lines.append(f"  malformed records skipped: {e['malformed_records']} {e['malformed_by_reason']}")
    if r["documents_out"] == 0:
        lines.append(f"  WARNING: every document was removed: {r['output']} has no rows")
    lines.append(f"  -> {r['output']}")
    return "\n".join(lines)
