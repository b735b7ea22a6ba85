"""
Benchmark clean_data/ on the chinese-poetry corpus. Two modes:

    python bench_clean.py                       # 100k poems: MinHash stage docs/s, accuracy, rival ratio
    python bench_clean.py --scale=1000000       # a 1M-document corpus with known duplicates, whole pipeline
    python bench_clean.py --scale=1000000 --redis_workers=1,2,4   # + Redis shards against one process

Run from the repository root (it reads data/chinese-poetry, from `make download`).

100k mode (scale=0): wall-clock docs/s of the MinHash stage alone (verdicts(stages="minhash") on the
normalised texts: shingles, signatures and band hashes in num_workers processes, candidate components,
exact verification) and of the SimHash stage; baby-llama2-chinese's own MinHash dedup
(data_clean/functions.py, DropDatasetDuplicate(threshold=0.85, num_perm=256), as its clear.py calls it) on the
same poems, run from the snapshot at rival_dir in a subprocess, so the ratio comes from one run.
Accuracy against exact Jaccard >= threshold on 5-gram sets: truth = pairs a permissive pre-filter finds
(256 other permutations, 64 bands of 4 rows: a pair at J = 0.8 is missed with probability ~1e-13) and whose
exact Jaccard reaches the threshold; recall = share of true pairs that share one of the pipeline's band
hashes (then exact verification confirms them all); precision = share of the pipeline's removals whose
named partner has exact Jaccard >= threshold, recomputed here from the texts with another implementation.

Scale mode: a corpus of `scale` documents built reproducibly from the poems: each of the first
scale / mean_copies poems that are exactly distinct after normalisation (all of them, with more copies, when
that is not enough) is a cluster of copies, documents drawn in a seeded random order; copy 0 is the poem,
each later copy is, with the rates below, identical, or has characters replaced, two lines swapped, or its
end cut. Written to out/bench_clean/scale_N/ (8 parquet parts), cleaned by `python -m clean_data` in a
subprocess (its report: docs/s per stage, peak RSS, bytes per document). Accuracy on `sample_clusters`
random clusters: every pair of their documents that reaches MinHash is checked by exact Jaccard (truth
from the planted clusters, no LSH); recall = share of those true pairs that share a band hash; document
recall = share of the documents the rule removes on the exact graph of their cluster that the pipeline
removed; precision as above. With redis_workers, the same corpus is cleaned by W shard processes started
in random order against one redis-server, and their kept ids compared with the single process's.
"""
import glob
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from babyllama.configurator import apply_overrides
from babyllama.readers import iter_documents
from clean_data import dedup, shards, shingles
from clean_data.clean import verdicts
from clean_data.normalize import normalize

# -----------------------------------------------------------------------------
input = "data/chinese-poetry"
bench_docs = 100_000
num_workers = 2
threshold = 0.8
simhash_k = 3
rival_dir = "/work/.mirror/DLLXW+baby-llama2-chinese/repo"  # git snapshot of baby-llama2-chinese ("" = skip)
rival_docs = 100_000
scale = 0  # > 0: the scale mode with this many documents
out = "out/bench_clean"
edit_rate = 0.02  # scale mode, per changed copy: share of characters replaced
p_identical = 0.25  # share of later copies left identical (exact duplicates)
p_swap = 0.3  # share of changed copies with two lines swapped
p_cut = 0.3  # share of changed copies cut at the end (5-20 % of the characters)
sample_clusters = 3000
mean_copies = 4  # scale mode: copies per poem (more when scale needs more than the poems x this)
redis_workers = None  # e.g. 1,2,4 (a tuple on the command line): also the Redis shard mode with these worker counts
seed = 0
# -----------------------------------------------------------------------------


def uptime():
    with open("/proc/loadavg") as f:
        return "load average " + " ".join(f.read().split()[:3])


def poems(n=None):
    """The first n poems' texts (all when n is None)."""
    return [d["text"] for d in itertools.islice(iter_documents([input]), n)]


def truth_jaccard(a, b):
    """Exact Jaccard of two normalised texts through shingle hash sets (not the pipeline's string sets)."""
    sa, sb = set(shingles.shingle_hashes_of(a).tolist()), set(shingles.shingle_hashes_of(b).tolist())
    return len(sa & sb) / len(sa | sb) if sa or sb else 1.0


def bands_of(norms, num_perm=120, bands=20, perm_seed=1):
    """The pipeline's band hashes (or, with other arguments, another LSH's) for normalised texts."""
    out = []
    for i in range(0, len(norms), 5000):
        h, c = shingles.shingle_hashes(norms[i:i + 5000])
        out.append(dedup.band_hashes(dedup.minhash_signatures(h, c, dedup.permutations(num_perm, perm_seed)), bands))
    return np.concatenate(out) if out else np.zeros((0, bands), np.uint64)


def share_band(b, i, j):
    return bool((b[i] == b[j]).any())


# the rival's timing run, written beside its functions.py (its folder is then the script's, first on sys.path);
# jieba, pandas and ujson are imported at the top of functions.py for other functions: stubbed when missing
RIVAL_RUNNER = """\
import importlib
import importlib.util
import json
import sys
import time
import types

for name in ("jieba", "pandas", "ujson"):
    if importlib.util.find_spec(name) is None:
        sys.modules[name] = types.ModuleType(name)
DropDatasetDuplicate = importlib.import_module("functions").DropDatasetDuplicate
with open("texts.json", encoding="utf-8") as f:
    texts = json.load(f)
d = DropDatasetDuplicate(threshold=0.85, num_perm=256)
t = time.perf_counter()
for i, x in enumerate(texts):
    d.add_doc(index=i, doc=x)
s = time.perf_counter() - t
print(json.dumps({"seconds": s, "removed": len(d.get_duplicate_indexs())}))
"""


def rival_speed(texts):
    """baby-llama2-chinese's DropDatasetDuplicate on texts, from its snapshot, in a subprocess (RIVAL_RUNNER):
    (docs/s, documents it removed)."""
    work = os.path.join(out, "rival")
    os.makedirs(work, exist_ok=True)
    git_dir = os.path.join(rival_dir, ".git") if os.path.isdir(os.path.join(rival_dir, ".git")) else rival_dir
    src = subprocess.run(["git", "--git-dir", git_dir, "show", "HEAD:data_clean/functions.py"],
                         capture_output=True, text=True, check=True).stdout
    for name, text in (("functions.py", src), ("texts.json", json.dumps(texts, ensure_ascii=False)),
                       ("run_rival.py", RIVAL_RUNNER)):
        with open(os.path.join(work, name), "w", encoding="utf-8") as f:
            f.write(text)
    res = subprocess.run([sys.executable, "run_rival.py"], cwd=work, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"rival run failed: {res.stderr[-2000:]}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    return len(texts) / r["seconds"], r["removed"]


def bench_100k():
    texts = poems(bench_docs)
    norms = [normalize(x) for x in texts]
    print(f"{len(texts):,} poems, {uptime()}")
    for stage in ("minhash", "simhash"):
        t = time.perf_counter()
        code, _, _ = verdicts(norms, stages=stage, num_workers=num_workers, threshold=threshold,
                              simhash_k=simhash_k)
        secs = time.perf_counter() - t
        print(f"{stage:8s} {len(norms) / secs:>9,.0f} docs/s wall ({num_workers} processes, {secs:.2f} s), "
              f"removed {(code > 0).sum():,}  [{uptime()}]")
        if stage == "minhash":
            ours, (code_m, partner, _) = len(norms) / secs, verdicts(norms, stages="minhash", num_workers=1)
    if rival_dir and not os.path.exists(rival_dir):
        print(f"baby-llama2-chinese: no snapshot at {rival_dir} (git clone it there, or --rival_dir=''): ratio skipped")
    elif rival_dir:
        rate, removed = rival_speed(texts[:rival_docs])
        print(f"baby-llama2-chinese MinHash (its code) {rate:,.0f} docs/s on {min(rival_docs, len(texts)):,} poems "
              f"(removed {removed:,}); ratio {ours / rate:.1f}x  [{uptime()}]")
    # accuracy
    valid = np.array([bool(s) for s in norms])
    loose = bands_of(norms, num_perm=256, bands=64, perm_seed=12345)
    ours_b = bands_of(norms)
    label, linked = dedup.candidate_components(loose, valid)
    members, bounds = dedup.component_groups(label, np.nonzero(linked)[0])
    truth, checked = set(), 0
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        m = members[lo:hi].tolist()
        for i, j in itertools.combinations(m, 2):
            if share_band(loose, i, j):
                checked += 1
                if truth_jaccard(norms[i], norms[j]) >= threshold:
                    truth.add((i, j))
    found = sum(share_band(ours_b, i, j) for i, j in truth)
    removed = np.nonzero(code_m)[0]
    ok = sum(truth_jaccard(norms[j], norms[partner[j]]) >= threshold for j in removed)
    print(f"accuracy vs exact Jaccard >= {threshold}: {len(truth):,} true pairs (pre-filter checked {checked:,}); "
          f"recall {found / max(len(truth), 1):.3f} ({found}/{len(truth)}); precision {ok / max(len(removed), 1):.3f} "
          f"({ok}/{len(removed)} removals with a partner at J >= {threshold})")


# ---- scale mode --------------------------------------------------------------------------------------------

def mutate(text, r):
    """A changed copy: characters replaced at edit_rate, maybe two lines swapped, maybe the end cut."""
    chars = list(text)
    for k in range(len(chars)):
        if r.random() < edit_rate and not chars[k].isspace():
            chars[k] = chr(0x4E00 + r.randrange(20000))
    lines = "".join(chars).split("\n")
    if r.random() < p_swap and len(lines) >= 2:
        a, b = r.sample(range(len(lines)), 2)
        lines[a], lines[b] = lines[b], lines[a]
    text = "\n".join(lines)
    if r.random() < p_cut:
        text = text[:int(len(text) * (1 - r.uniform(0.05, 0.2)))]
    return text


def document(k, base, order):
    """Document k of the corpus: (text, cluster)."""
    copy, poem = divmod(int(order[k]), len(base))
    if copy == 0:
        return base[poem], poem
    r = random.Random(seed * 1_000_003 + int(order[k]))
    return (base[poem] if r.random() < p_identical else mutate(base[poem], r)), poem


def build_corpus(n, d, parts=8):
    """Write the corpus (parts parquet files, columns text, id) and clusters.npy; reuses a finished one."""
    if os.path.exists(os.path.join(d, "clusters.npy")):
        return np.load(os.path.join(d, "clusters.npy")), len(glob.glob(os.path.join(d, "part*.parquet")))
    texts = poems()
    seen, base = set(), []
    for t in texts:  # clusters start from exactly distinct poems
        key = normalize(t)
        if key and key not in seen:
            seen.add(key)
            base.append(t)
    copies = max(mean_copies, -(-n // len(base)))
    base = base[:-(-n // copies)]
    order = np.random.default_rng(seed).permutation(copies * len(base))[:n]
    clusters = np.empty(n, np.int64)
    os.makedirs(d, exist_ok=True)
    for p in range(parts):
        lo, hi = p * n // parts, (p + 1) * n // parts
        rows = [document(k, base, order) for k in range(lo, hi)]
        clusters[lo:hi] = [c for _, c in rows]
        pq.write_table(pa.table({"text": [t for t, _ in rows], "id": [str(k) for k in range(lo, hi)]}),
                       os.path.join(d, f"part{p}.parquet"), compression="zstd")
    np.save(os.path.join(d, "clusters.npy"), clusters)
    print(f"built {n:,} documents from {len(base):,} distinct poems ({copies} copies each at most) in {d}")
    return clusters, parts


def run_clean(inputs, out_dir, extra=()):
    """python -m clean_data in a subprocess; returns its report and wall seconds."""
    t = time.time()
    subprocess.run([sys.executable, "-m", "clean_data", f"--input={','.join(inputs)}", f"--out_dir={out_dir}",
                    f"--num_workers={num_workers}", *extra], check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(out_dir, "report.json"), encoding="utf-8") as f:
        return json.load(f), time.time() - t


def kept_ids(out_dir):
    """The kept documents as (source, line): the corpus' own identity (the parquet reader's fast path reads only
    the text column, so the id column is empty)."""
    t = pq.read_table(os.path.join(out_dir, "clean.parquet"), columns=["source", "line"])
    return set(zip(t.column("source").to_pylist(), t.column("line").to_pylist()))


def removals(path):
    """doc -> (stage, dup_of) from removed.jsonl (doc = position: one shard 0)."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            x = json.loads(line)
            out[x["doc"]] = (x["stage"], x.get("dup_of"))
    return out


def ideal_removed(members, norms):
    """The rule on the exact graph of one cluster (members in document order): removed member -> the kept
    members it is a near-duplicate of."""
    kept, gone = [], {}
    for j in members:
        partners = [i for i in kept if truth_jaccard(norms[i], norms[j]) >= threshold]
        if partners:
            gone[j] = partners
        else:
            kept.append(j)
    return gone


def bench_scale():
    d = os.path.join(out, f"scale_{scale}")
    clusters, parts = build_corpus(scale, d)
    inputs = [os.path.join(d, f"part{p}.parquet") for p in range(parts)]
    print(f"cleaning {scale:,} documents, {uptime()}")
    report, wall = run_clean(inputs, os.path.join(d, "clean"))
    rss = report["peak_rss_mb"]
    print(f"whole pipeline: {wall:.0f} s wall ({scale / wall:,.0f} docs/s), peak RSS main {rss['main']:,.0f} MiB + "
          f"largest worker {rss['largest_worker']:,.0f} MiB = {(rss['main'] + rss['largest_worker']) * 2 ** 20 / scale:,.0f}"
          f" bytes per document; arrays {report['bytes_per_document']} bytes per document  [{uptime()}]")
    for s, v in report["stages"].items():
        print(f"  {s:8s} in {v['in']:>10,} removed {v['removed']:>10,}  {v['seconds']:8.1f} s  {v['removed_by']}")
    # accuracy on sampled clusters
    gone = removals(os.path.join(d, "clean", "removed.jsonl"))
    rng = np.random.default_rng(seed + 1)
    picked = set(rng.choice(clusters.max() + 1, sample_clusters, replace=False).tolist())
    docs = np.nonzero(np.isin(clusters, list(picked)))[0]
    texts = {}
    for p, path in enumerate(inputs):
        lo = p * scale // parts
        col = pq.read_table(path, columns=["text"]).column("text")
        for k in docs[(docs >= lo) & (docs < lo + col.length())]:
            texts[int(k)] = normalize(col[int(k) - lo].as_py())
    entering = [k for k in docs.tolist() if gone.get(k, ("",))[0] not in ("filter", "exact") and texts[k]]
    b = dict(zip(entering, bands_of([texts[k] for k in entering])))
    by_cluster = {}
    for k in entering:
        by_cluster.setdefault(int(clusters[k]), []).append(k)
    true_pairs = found = should = did = away = 0
    for members in by_cluster.values():
        for i, j in itertools.combinations(members, 2):
            if truth_jaccard(texts[i], texts[j]) >= threshold:
                true_pairs += 1
                found += bool((b[i] == b[j]).any())
        for j, partners in ideal_removed(members, texts).items():
            should += 1
            did += j in gone
            if j not in gone:  # why the pipeline kept it: its partners went (to a document outside the cluster)
                away += all(i in gone for i in partners)
    near = [(k, v[1]) for k, v in gone.items() if v[0] == "minhash"]
    sample = random.Random(seed).sample(near, min(5000, len(near)))
    partner_texts = {}
    for p, path in enumerate(inputs):  # the partners' texts, read back by position
        lo, hi = p * scale // parts, (p + 1) * scale // parts
        want = sorted({x for pair in sample for x in pair if lo <= x < hi})
        if want:
            col = pq.read_table(path, columns=["text"]).column("text")
            for x in want:
                partner_texts[x] = normalize(col[x - lo].as_py())
    ok = sum(truth_jaccard(partner_texts[j], partner_texts[i]) >= threshold for j, i in sample)
    print(f"accuracy on {len(by_cluster):,} sampled clusters ({len(entering):,} documents reaching MinHash): "
          f"{true_pairs:,} true pairs (exact J >= {threshold}), recall {found / max(true_pairs, 1):.4f}; "
          f"documents the rule removes on the exact graph: {should:,}, removed by the pipeline "
          f"{did / max(should, 1):.4f} (of the {should - did} kept, {away} lost every partner to a removal the cluster alone "
          f"does not show: a near-duplicate outside the cluster); precision {ok / max(len(sample), 1):.4f} ({ok}/{len(sample)} sampled "
          f"MinHash removals with a partner at J >= {threshold})")
    if redis_workers:
        bench_redis(inputs, kept_ids(os.path.join(d, "clean")), d)


def bench_redis(inputs, want, d):
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server not found (apt-get install redis-server)")
    proc, url = shards.start_server(exe, d)
    try:
        for w in (redis_workers if isinstance(redis_workers, tuple) else (redis_workers,)):
            order = random.Random(seed + w).sample(range(w), w)
            if w > 1 and order == sorted(order):  # never the corpus order: the shards must not rely on it
                order.reverse()
            t = time.time()
            procs = []
            for s in order:  # shard s gets a contiguous run of the parts; started in random order
                part = inputs[s * len(inputs) // w:(s + 1) * len(inputs) // w]
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "clean_data", f"--input={','.join(part)}",
                     f"--out_dir={os.path.join(d, f'redis{w}', f'shard{s}')}", f"--redis_url={url}",
                     f"--redis_prefix=bench{w}", f"--shard_id={s}", f"--num_shards={w}",
                     f"--num_workers={max(1, num_workers // w)}"], stdout=subprocess.DEVNULL))
                time.sleep(random.Random(s).uniform(0, 1))
            if any(p.wait() for p in procs):
                raise SystemExit(f"a shard failed with {w} workers")
            got = set().union(*(kept_ids(os.path.join(d, f"redis{w}", f"shard{s}")) for s in range(w)))
            rss = max(json.load(open(os.path.join(d, f"redis{w}", f"shard{s}", "report.json")))["peak_rss_mb"]["main"]
                      for s in range(w))
            print(f"redis, {w} workers (started in order {order}): {time.time() - t:.0f} s, kept {len(got):,}, "
                  f"identical to one process: {got == want} (only there {len(want - got)}, only here "
                  f"{len(got - want)}), largest shard peak RSS {rss:,.0f} MiB  [{uptime()}]")
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    apply_overrides(globals())
    bench_scale() if scale else bench_100k()
