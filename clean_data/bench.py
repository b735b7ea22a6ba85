"""
Benchmark clean_data/ on the chinese-poetry corpus: speed of each dedup stage on bench_docs poems, and
precision / recall of MinHash and of SimHash against exact Jaccard on the same shingles.

    python -m clean_data.bench                                 # 100k poems, 2 worker processes
    python -m clean_data.bench --bench_docs=20000 --full=True  # also the whole pipeline on the whole corpus

Run from the repository root (it reads data/chinese-poetry, from `make download`).

Speed: wall-clock docs/s of a stage run alone on the same in-memory documents: signatures in a pool of
num_workers processes + the sequential index walk (dedup mode: query, then insert the survivors).

Accuracy, definitions: truth = pairs with exact Jaccard >= threshold (5-gram sets of the normalised
texts). Candidates for truth come from a permissive pre-filter (MinHashLSH at Jaccard 0.5, 256
permutations, another seed: misses a pair at J >= 0.8 with probability < 1e-6), then exact Jaccard decides.
MinHash predicted pairs = every pair that LSH(threshold, num_perm) returns and whose signature estimate
reaches the threshold (all documents inserted, all queried); SimHash predicted = Hamming <= k found
through the index. precision = share of predicted pairs (a random sample of at most 5,000) whose exact
Jaccard >= threshold; recall = share of true pairs predicted. Also the false-positive rate on 200,000
random non-pairs. The 2-core machine is shared: run twice, read ratios.
"""
import itertools
import random
import resource
import time
from multiprocessing import Pool

import numpy as np

from clean_data import dedup
from clean_data.normalize import normalize
from clean_data.readers import iter_documents

# -----------------------------------------------------------------------------
input = "data/chinese-poetry"
bench_docs = 100_000
num_workers = 2
ngram = 5
num_perm = 128
threshold = 0.8
lsh_threshold = 0.65  # banding threshold of the LSH (candidates), verified at threshold
simhash_k = 3
chunk_docs = 2000
sample_seed = 0
full = False  # also run the whole pipeline on the whole corpus (python -m clean_data) and print its report
# -----------------------------------------------------------------------------


def _sig_chunk(texts):
    h, c = dedup.shingle_hashes(texts, ngram)
    return (dedup.minhash_signatures(h, c, dedup.permutations(num_perm)), dedup.unique_shingles(h, c)), c


def _fp_chunk(texts):
    h, c = dedup.shingle_hashes(texts, ngram)
    return dedup.simhash_fingerprints(h, c), c


def chunked(xs, n):
    return [xs[i:i + n] for i in range(0, len(xs), n)]


def run_stage(norms, kind):
    """Dedup norms with one method; returns (seconds, removed)."""
    t = time.time()
    if kind == "minhash":
        index = dedup.MinHashDedup(threshold, num_perm, lsh_threshold=lsh_threshold)
    else:
        index = dedup.SimHashDedup(simhash_k)
    removed = 0
    with Pool(num_workers) as pool:
        for keys, counts in pool.imap(_sig_chunk if kind == "minhash" else _fp_chunk, chunked(norms, chunk_docs)):
            for j in range(len(counts)):
                if not counts[j]:
                    continue
                found = (index.check_and_add(keys[0][j], j, keys[1][j]) if kind == "minhash"
                         else index.check_and_add(keys[j], j))
                if found is not None:
                    removed += 1
    return time.time() - t, removed


def jaccard(a, b):
    return len(a & b) / len(a | b) if a or b else 1.0


def main():
    t = time.time()
    texts = [d["text"] for d in itertools.islice(iter_documents([input]), bench_docs)]
    t_read = time.time() - t
    t = time.time()
    norms = [normalize(x) for x in texts]
    t_norm = time.time() - t
    print(f"{len(texts):,} documents ({sum(map(len, texts)):,} chars): read {len(texts) / t_read:,.0f} docs/s, "
          f"normalise {len(texts) / t_norm:,.0f} docs/s")
    t = time.time()
    exact_removed = len(norms) - len({dedup.exact_key(s) for s in norms})
    print(f"exact    {len(norms) / (time.time() - t):>9,.0f} docs/s  removed {exact_removed:,}")
    for kind in ("minhash", "simhash"):
        secs, removed = run_stage(norms, kind)
        print(f"{kind:8s} {len(norms) / secs:>9,.0f} docs/s  removed {removed:,}  "
              f"({secs:.1f} s, {num_workers} processes)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")

    # ---- accuracy against exact Jaccard ----
    cache = {}

    def shingles(i):
        if i not in cache:
            cache[i] = set(dedup.shingle_hashes_of(norms[i], ngram).tolist())
        return cache[i]

    def exact(i, j):
        return jaccard(shingles(i), shingles(j))

    with Pool(num_workers) as pool:
        sigs = np.concatenate([s[0] for s, _ in pool.map(_sig_chunk, chunked(norms, chunk_docs))])
        fps = np.concatenate([f for f, _ in pool.map(_fp_chunk, chunked(norms, chunk_docs))])
    valid = [i for i, s in enumerate(norms) if s]
    # permissive pre-filter for the truth
    from datasketch import LeanMinHash, MinHashLSH
    perms256 = dedup.permutations(256, seed=12345)
    loose = MinHashLSH(threshold=0.5, num_perm=256)
    sig256 = np.concatenate([dedup.minhash_signatures(*dedup.shingle_hashes(c, ngram), perms256)
                             for c in chunked(norms, chunk_docs)])
    with loose.insertion_session() as s:
        for i in valid:
            s.insert(i, LeanMinHash(seed=1, hashvalues=sig256[i], scheme="affine32"), check_duplication=False)
    truth = set()
    for i in valid:
        for j in loose.query(LeanMinHash(seed=1, hashvalues=sig256[i], scheme="affine32")):
            if j > i and exact(i, j) >= threshold:
                truth.add((i, j))
    # MinHash predictions (all docs in the index)
    lsh = MinHashLSH(threshold=lsh_threshold, num_perm=num_perm)
    with lsh.insertion_session() as s:
        for i in valid:
            s.insert(i, LeanMinHash(seed=1, hashvalues=sigs[i], scheme="affine32"), check_duplication=False)
    mh_pred, mh_verified = set(), set()  # decided by the signature estimate / by exact Jaccard (clean_data's rule)
    for i in valid:
        for j in lsh.query(LeanMinHash(seed=1, hashvalues=sigs[i], scheme="affine32")):
            if j > i and np.mean(sigs[i] == sigs[j]) >= threshold:
                mh_pred.add((i, j))
            if j > i and exact(i, j) >= threshold:
                mh_verified.add((i, j))
    # SimHash predictions through the index
    sh = dedup.SimHashDedup(simhash_k)
    sh_pred = set()
    for i in valid:
        v = int(fps[i])
        for key in sh._keys(v):
            for entry in sh.index.bucket.get(key, ()):
                other, oid = entry.split(",", 1)
                if (int(other, 16) ^ v).bit_count() <= simhash_k:
                    sh_pred.add((int(oid), i))
        for key in sh._keys(v):
            sh.index.bucket[key].add("%x,%s" % (v, i))
    rng = random.Random(sample_seed)
    nonpairs = [tuple(sorted(rng.sample(valid, 2))) for _ in range(200_000)]
    nonpairs = [p for p in nonpairs if p not in truth]
    print(f"accuracy vs exact Jaccard >= {threshold} on {len(valid):,} docs: {len(truth):,} true pairs "
          f"(pre-filter: LSH J>=0.5, 256 perms, then exact Jaccard)")
    for name, pred, sig_match in (("minhash (estimate only)", mh_pred,
                                   lambda p: np.mean(sigs[p[0]] == sigs[p[1]]) >= threshold),
                                  ("minhash (LSH + exact check, as clean_data)", mh_verified,
                                   lambda p: np.mean(sigs[p[0]] == sigs[p[1]]) >= threshold and exact(*p) >= threshold),
                                  ("simhash", sh_pred,
                                   lambda p: (int(fps[p[0]]) ^ int(fps[p[1]])).bit_count() <= simhash_k)):
        sample = rng.sample(sorted(pred), min(5000, len(pred)))
        precision = np.mean([exact(i, j) >= threshold for i, j in sample]) if sample else float("nan")
        recall = len(pred & truth) / len(truth) if truth else float("nan")
        fpr = np.mean([sig_match(p) for p in nonpairs])
        print(f"{name:8s} predicted {len(pred):>7,} pairs  precision {precision:.3f} (sample {len(sample):,})  "
              f"recall {recall:.3f}  false-positive rate on {len(nonpairs):,} random non-pairs {fpr:.2e}")

    if full:
        from clean_data.clean import clean, format_report
        print(format_report(clean(input, "out/bench_clean/full", progress=False, num_workers=num_workers)))


if __name__ == "__main__":
    from configurator import apply_overrides
    apply_overrides(globals())
    main()
