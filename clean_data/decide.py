"""
Pass 2 of a cleaning run: the verdicts over the arrays of the whole corpus, by the rule in dedup.py. Every
document is kept or removed by the first stage that catches it (filter, exact, minhash, simhash), and a
duplicate names the document it duplicates.
"""
import numpy as np

from clean_data import dedup
from clean_data.workers import bounded, resolve_batch, timed

STAGES = ("filter", "exact", "minhash", "simhash")  # verdict code k > 0: removed by STAGES[k - 1]
DUP_REASON = {"exact": "exact_dup", "minhash": "near_dup", "simhash": "near_dup"}


def _batches(members, bounds, size):
    """Cut the components (members[bounds[c]:bounds[c+1]]) into runs of about `size` members: (lo, hi, bounds
    relative to lo) per batch."""
    lo = 0
    while lo < len(bounds) - 1:
        hi = max(int(np.searchsorted(bounds, bounds[lo] + size, side="right")) - 1, lo + 1)
        yield bounds[lo], bounds[hi], bounds[lo:hi + 1] - bounds[lo]
        lo = hi


def decide(a, c, walk, pool, texts_at, own, hub=None):
    """Verdicts for the arrays a of the whole corpus (document order), by the rule in dedup.py. Returns (code,
    partner, score, secs): code int8 per document (0 kept, else 1 + index in STAGES of the stage that removed
    it), partner int64 (position of the document it duplicates, -1), score float32 (exact Jaccard for
    minhash, Hamming distance for simhash), secs the seconds of each stage here. own: bool mask of the
    documents this process is responsible for; MinHash components without one of them are skipped. hub: the
    Redis exchange (None in one process): share_texts(positions) before verifying, merge(code) after MinHash."""
    n = len(a["filter"])
    code = np.where(a["filter"] > 0, 1, 0).astype(np.int8)
    partner, score, secs = np.full(n, -1, np.int64), np.zeros(n, np.float32), {}
    if "exact" in walk:
        with timed(secs, "exact"):
            p = dedup.first_of_equal(a["exact"], code == 0)
            code[p >= 0], partner[p >= 0] = 2, p[p >= 0]
    if "minhash" in walk:
        with timed(secs, "minhash"):
            label, linked = dedup.candidate_components(a["bands"], (code == 0) & ~a["empty"])
            members, bounds = dedup.component_groups(label, np.nonzero(linked)[0])
            mine = np.add.reduceat(own[members], bounds[:-1]) > 0 if len(members) else np.zeros(0, bool)
            sizes = np.diff(bounds)[mine]
            members, bounds = members[np.repeat(mine, np.diff(bounds))], np.concatenate([[0], np.cumsum(sizes)])
            if hub is not None:
                hub.share_texts(members, bounds)
            tasks = ((lo, (a["bands"][members[lo:hi]], texts_at(members[lo:hi]), rel, c.threshold, c.ngram))
                     for lo, hi, rel in _batches(members, bounds, 4000))
            for lo, removed in bounded(pool, resolve_batch, tasks, 2 * max(1, c.num_workers)):
                for j, i, jac in removed:
                    code[members[lo + j]], partner[members[lo + j]], score[members[lo + j]] = 3, members[lo + i], jac
        if hub is not None:
            code = hub.merge(code)
    if "simhash" in walk:
        with timed(secs, "simhash"):
            i, j = dedup.simhash_pairs(a["simhash"], (code == 0) & ~a["empty"], c.simhash_k)
            p = dedup.greedy_partners(i, j, n)
            hit = p >= 0
            code[hit], partner[hit] = 4, p[hit]
            score[hit] = dedup.popcount64(a["simhash"][hit] ^ a["simhash"][p[hit]])
    return code, partner, score, secs
