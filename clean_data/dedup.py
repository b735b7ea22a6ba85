"""
Deduplication over compact arrays: exact (hash of the normalised text), MinHash + banded LSH with every
candidate verified by exact Jaccard, SimHash through permuted-table bucketing. The per-document state kept
for the whole corpus is numbers in numpy arrays (an 8-byte exact key, `bands` 8-byte band hashes, an 8-byte
fingerprint, a filter code and an empty flag: 178 bytes at 20 bands); texts are read back from a scratch
file only for the documents that have a candidate.

Shingles and their 64-bit hashes are in shingles.py.

MinHash: for each of num_perm permutations, h_i(x) = (a_i * x + b_i) mod 2^32 on the top 32 bits x of the
well-mixed shingle hash (a_i odd: a bijection of the 32-bit values; uint32 arithmetic runs twice as many
lanes as uint64); the signature is the minimum over the document's shingles. Signatures are cut into
`bands` bands of num_perm / bands rows and each band hashed to 64 bits: two documents are LSH candidates
when they share a band hash (probability 1 - (1 - J^rows)^bands: 0.998 at J = 0.8 for 20 x 6).

The rule (decided in document order; the same whatever the chunk size, process or machine count):
- exact: a document is removed when an earlier document that passed the filters has the same key;
- minhash: a document is removed when an earlier *kept* document shares a band hash with it and their exact
  Jaccard (recomputed from the two texts' shingle sets) is >= threshold; its partner is the earliest such
  document. So in a chain A~B~C with J(A, C) below the threshold, B goes (A is kept) and C stays (its only
  partner B was removed). Candidate pairs come from sorting each band's hashes; union-find over them gives
  the connected components, which are resolved independently (in parallel, or on several machines);
- simhash: a document is removed when an earlier kept document's fingerprint is within Hamming distance k.

SimHash: the simhash package's algorithm (bit i of the fingerprint = majority vote of bit i over the
shingle hashes, every occurrence counted), vectorised. Pairs within distance k agree on at least 3 of k + 3
bit blocks (pigeonhole), so sorting the fingerprints masked to each 3-block combination finds all of them
(20 tables of ~32-bit keys for k = 3: few chance collisions even at millions of documents).
"""
import hashlib
from itertools import combinations

import numpy as np

from clean_data.shingles import P, mix64

_BLOCK = 8192  # shingles per (num_perm x block) uint32 matrix: 8192 * 120 * 4 bytes = 4 MB
_POP8 = np.array([bin(i).count("1") for i in range(256)], np.uint8)


# ---- per chunk: hashes, signatures, fingerprints (in worker processes) ------------------------------------


def permutations(num_perm, seed=1):
    """num_perm (a, b) uint32 pairs of the multiply-add family mod 2^32; a odd."""
    rng = np.random.RandomState(seed)
    a = rng.randint(0, 2 ** 31, size=num_perm, dtype=np.uint64).astype(np.uint32) * np.uint32(2) + np.uint32(1)
    b = rng.randint(0, 2 ** 32, size=num_perm, dtype=np.uint64).astype(np.uint32)
    return a, b


def minhash_signatures(hashes, counts, perms):
    """(documents x num_perm) uint32 MinHash signatures. A document without shingles gets all ones.
    Works on (num_perm x shingles) blocks of whole documents so each reduction runs along contiguous
    memory and a block stays in cache."""
    a, b = perms[0][:, None], perms[1][:, None]
    x = (hashes >> np.uint64(32)).astype(np.uint32)
    sig = np.full((len(counts), len(a)), np.iinfo(np.uint32).max, np.uint32)
    nonempty = np.nonzero(counts)[0]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    i = 0
    while i < len(nonempty):  # blocks of whole documents, about _BLOCK shingles each
        j = np.searchsorted(offsets[nonempty + 1], offsets[nonempty[i]] + _BLOCK, side="right")
        j = max(j, i + 1)
        docs = nonempty[i:j]
        lo, hi = offsets[docs[0]], offsets[docs[-1] + 1]
        hv = a * x[None, lo:hi]
        hv += b
        sig[docs] = np.minimum.reduceat(hv, offsets[docs] - lo, axis=1).T
        i = j
    return sig


def band_hashes(sig, bands):
    """(documents x bands) uint64: band k hashes signature columns [k * rows, (k + 1) * rows), rows =
    num_perm // bands. Raises ValueError when bands does not divide num_perm."""
    n, num_perm = sig.shape
    if bands < 1 or num_perm % bands:
        raise ValueError(f"bands={bands} must divide num_perm={num_perm}")
    rows = num_perm // bands
    cols = sig.reshape(n, bands, rows).astype(np.uint64)
    h = np.zeros((n, bands), np.uint64)
    for r in range(rows):
        h = mix64(h * P + cols[:, :, r])
    return h


def simhash_fingerprints(hashes, counts):
    """64-bit SimHash per document: bit i set when more than half of its shingle hashes have bit i set
    (the simhash package's rule). A document without shingles gets 0."""
    fp = np.zeros(len(counts), np.uint64)
    nonempty = np.nonzero(counts)[0]
    if len(nonempty) == 0:
        return fp
    # (64 x shingles) bit matrix, row i = bit i: transpose the 8 bytes first (cheap), then unpack rows
    byte_rows = np.ascontiguousarray(hashes.view(np.uint8).reshape(-1, 8).T)
    bits = np.unpackbits(byte_rows, axis=0, bitorder="little")
    offsets = np.concatenate([[0], np.cumsum(counts)])
    ones = np.add.reduceat(bits, offsets[nonempty], axis=1, dtype=np.uint32)  # (64 x documents)
    majority = np.ascontiguousarray((ones * 2 > counts[nonempty]).T)
    fp[nonempty] = np.packbits(majority, axis=1, bitorder="little").view("<u8").ravel()
    return fp


def exact_key(norm):
    """8-byte key of a normalised text (blake2b: collisions are not a practical concern at 2^64)."""
    return int.from_bytes(hashlib.blake2b(norm.encode("utf-8"), digest_size=8).digest(), "little")


def popcount64(x):
    """Set bits of each uint64 (any numpy version: a byte table)."""
    x = np.ascontiguousarray(x, np.uint64)
    return _POP8[x.view(np.uint8).reshape(-1, 8)].sum(axis=1, dtype=np.int64)


# ---- exact Jaccard from the text (verification) -------------------------------------------------------

def shingle_set(text, n=5):
    """The set of character n-grams of a normalised text (the whole text when shorter than n; empty for "")."""
    return {text[i:i + n] for i in range(max(len(text) - n + 1, 1 if text else 0))}


def jaccard(a, b):
    """Jaccard of two sets (1.0 for two empty sets)."""
    union = len(a | b)
    return len(a & b) / union if union else 1.0


# ---- decisions over the whole corpus (compact arrays, document order) ------------------------------------

def first_of_equal(keys, alive):
    """partner[i] = position of the first alive document with keys[i] when an earlier alive one has it, else -1
    (int64, one per document). keys: (N,) uint64; alive: (N,) bool."""
    partner = np.full(len(keys), -1, np.int64)
    idx = np.nonzero(alive)[0]
    order = idx[np.argsort(keys[idx], kind="stable")]  # equal keys stay in document order
    k = keys[order]
    starts = np.ones(len(order), bool)
    starts[1:] = k[1:] != k[:-1]
    first = order[np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))]
    partner[order[~starts]] = first[~starts]
    return partner


def union(label, u, v):
    """Union-find step over the edges (u, v), in place: label is a forest of parent pointers with
    label[x] <= x, fully compressed on return (label[x] = the smallest node of x's component). Roots of
    an edge's two ends are hooked, the larger under the smaller, until no edge spans two roots."""
    while True:
        ru, rv = label[u], label[v]
        apart = ru != rv
        if not apart.any():
            return label
        np.minimum.at(label, np.maximum(ru[apart], rv[apart]), np.minimum(ru[apart], rv[apart]))
        while True:  # pointer jumping: every node straight to its root
            nxt = label[label]
            if np.array_equal(nxt, label):
                break
            label[:] = nxt


def candidate_components(bands, alive):
    """Connected components of the candidate graph (alive documents sharing any band hash), one band at a
    time so at most one band's edges exist at once: in each band every document whose hash an earlier one
    has is linked to the first of them. Returns (label, linked): label (N,) int64 as union() leaves it,
    linked (N,) bool = has at least one candidate. bands: (N, b) uint64; alive: (N,) bool."""
    n = len(alive)
    label, linked = np.arange(n, dtype=np.int64), np.zeros(n, bool)
    idx = np.nonzero(alive)[0]
    for k in range(bands.shape[1]):
        partner = first_of_equal(bands[idx, k], np.ones(len(idx), bool))
        has = partner >= 0
        u, v = idx[partner[has]], idx[has]
        linked[u] = linked[v] = True
        union(label, u, v)
    return label, linked


def component_groups(label, nodes):
    """Components with two or more of the given nodes: (members, bounds): members = nodes sorted by
    (component, position); component c is members[bounds[c]:bounds[c + 1]], in document order."""
    nodes = np.unique(nodes)
    order = nodes[np.lexsort((nodes, label[nodes]))]
    lab = label[order]
    cuts = np.concatenate([[0], np.nonzero(lab[1:] != lab[:-1])[0] + 1, [len(order)]])
    sizes = np.diff(cuts)
    keep = np.repeat(sizes >= 2, sizes)
    members = order[keep]
    bounds = np.concatenate([[0], np.cumsum(sizes[sizes >= 2])])
    return members, bounds


def resolve_component(bands, texts, threshold, n=5):
    """The MinHash rule inside one component, members in document order. bands: (m, b) uint64 band hashes,
    texts: the m normalised texts. Returns [(j, i, jaccard)] for each removed member j (indices into the
    component): i is the earliest kept member sharing a band hash with j whose exact Jaccard >= threshold."""
    kept = np.ones(len(texts), bool)
    sets = [None] * len(texts)
    removed = []
    for j in range(1, len(texts)):
        for i in np.nonzero(kept[:j] & (bands[:j] == bands[j]).any(axis=1))[0]:
            for x in (i, j):
                if sets[x] is None:
                    sets[x] = shingle_set(texts[x], n)
            jac = jaccard(sets[i], sets[j])
            if jac >= threshold:
                kept[j] = False
                removed.append((j, int(i), jac))
                break
    return removed


def simhash_pairs(fps, alive, k):
    """Every pair (i, j), i < j, of alive documents whose fingerprints differ in at most k bits. Returns (i, j)
    int64 arrays sorted by (j, i). fps: (N,) uint64."""
    idx = np.nonzero(alive)[0]
    f = fps[idx]
    blocks = np.array_split(np.arange(64), k + 3)
    masks = [sum(1 << int(bit) for bit in blk) for blk in blocks]
    found = []
    for combo in combinations(range(len(blocks)), 3):
        key = f & np.uint64(sum(masks[c] for c in combo))
        order = np.argsort(key, kind="stable")
        kk = key[order]
        cuts = np.concatenate([[0], np.nonzero(kk[1:] != kk[:-1])[0] + 1, [len(kk)]])
        for size in np.unique(np.diff(cuts)):  # runs of one size at a time: all their pairs in one numpy step
            if size < 2:
                continue
            run = cuts[:-1][np.diff(cuts) == size]
            a, b = np.triu_indices(size, 1)
            i, j = order[run[:, None] + a].ravel(), order[run[:, None] + b].ravel()
            near = popcount64(f[i] ^ f[j]) <= k
            found.append(np.stack([np.minimum(i, j)[near], np.maximum(i, j)[near]], axis=1))
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pairs = np.unique(np.concatenate(found), axis=0)
    pairs = pairs[np.lexsort((pairs[:, 0], pairs[:, 1]))]
    return idx[pairs[:, 0]], idx[pairs[:, 1]]


def greedy_partners(i, j, n):
    """Document-order rule over verified pairs (i < j, sorted by (j, i)): j is removed when one of its i is
    kept; its partner is the earliest such i. Returns partner (N,) int64, -1 for kept documents."""
    partner = np.full(n, -1, np.int64)
    for a, b in zip(i.tolist(), j.tolist()):
        if partner[b] < 0 and partner[a] < 0:
            partner[b] = a
    return partner
