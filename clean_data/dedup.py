"""
Deduplication: exact (hash of the normalised text), MinHash + LSH (datasketch), SimHash + its index
(simhash package). Signatures are computed here with numpy, a whole chunk of documents at a time; the
indexes are the libraries' own.

Shingles are character n-grams (default n=5) of the normalised text, so "明月光照" and "照光明月" share no
shingle although they share every character (single-character shingles call them duplicates). A text
shorter than n is one shingle, itself.

Shingle hash: a polynomial over the n code points (uint64, wrapping) followed by the splitmix64 finaliser,
so every bit of the 64-bit value depends on every character; computed for all positions of all documents
of a chunk in n vectorised numpy steps.

MinHash: for each of num_perm permutations, h_i(x) = (a_i * x + b_i) mod 2^64 >> 32 (multiply-shift with
random odd a_i: a universal family on the well-mixed 64-bit shingle hashes); the signature is the minimum
over the document's shingles, one (shingles x num_perm) numpy op per block. Wrapped in datasketch
LeanMinHash(scheme="affine32") for MinHashLSH. LSH returns candidates; a candidate counts as a duplicate
only when the share of equal signature slots (the Jaccard estimate) reaches the threshold, which removes
most LSH false positives. The index holds the documents kept so far, so the first of a cluster survives.

SimHash: the simhash package's algorithm (bit i of the fingerprint = majority vote of bit i over the
shingle hashes, every occurrence counted), vectorised; fingerprints go into simhash.SimhashIndex, which
finds Hamming distance <= k through its k+1 block buckets (no all-pairs comparison).
"""
import hashlib
import logging
from urllib.parse import urlparse

import numpy as np

_P = np.uint64(0x100000001B3)  # polynomial base (the FNV prime): odd, so no information is shifted out
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_BLOCK = 4096  # shingles per (num_perm x block) matrix: 4096 * 128 * 8 bytes = 4 MB


def _mix64(x):
    """splitmix64 finaliser, vectorised (uint64 arithmetic wraps, which is what we want)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def shingle_hashes(texts, n=5):
    """64-bit hashes of the character n-grams of each text, every position (duplicates kept).
    Returns (hashes, counts): hashes concatenated text after text, counts[j] = shingles of text j."""
    # a text shorter than n is padded with NULs to n characters: one shingle, the whole text
    texts = [t + "\0" * (n - len(t)) if 0 < len(t) < n else t for t in texts]
    lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    counts = np.maximum(lengths - n + 1, 0)
    if counts.sum() == 0:
        return np.zeros(0, np.uint64), counts
    cp = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    m = len(cp) - n + 1
    h = np.zeros(m, np.uint64)
    for i in range(n):  # rolling polynomial over every window of the concatenation
        h = h * _P + cp[i:i + m]
    # keep the windows that stay inside one text: text j's windows start at starts[j] .. +counts[j]-1
    starts = np.cumsum(lengths) - lengths
    first = np.cumsum(counts) - counts  # index of text j's first shingle in the output
    idx = np.arange(counts.sum()) + np.repeat(starts - first, counts)
    return _mix64(h[idx]), counts


def unique_shingles(hashes, counts):
    """Per document, its sorted unique shingle hashes (what exact Jaccard compares)."""
    ends = np.cumsum(counts)
    return [np.unique(hashes[e - c:e]) for e, c in zip(ends, counts)]


def exact_jaccard(a, b):
    """Jaccard of two sorted unique uint64 arrays."""
    inter = np.intersect1d(a, b, assume_unique=True).size
    union = a.size + b.size - inter
    return inter / union if union else 1.0


def shingle_hashes_of(text, n=5):
    """Shingle hashes of one text (for tests and the benchmark's exact Jaccard)."""
    return shingle_hashes([text], n)[0]


def permutations(num_perm, seed=1):
    """num_perm (a, b) pairs of the multiply-shift family; a odd."""
    rng = np.random.RandomState(seed)
    a = rng.randint(0, 2 ** 63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.randint(0, 2 ** 63, size=num_perm, dtype=np.uint64)
    return a, b


def minhash_signatures(hashes, counts, perms):
    """(documents x num_perm) uint32 MinHash signatures. A document without shingles gets all ones.
    Works on (num_perm x shingles) blocks of whole documents so each reduction runs along contiguous
    memory and a block stays in cache."""
    a, b = perms[0][:, None], perms[1][:, None]
    sig = np.full((len(counts), len(a)), np.iinfo(np.uint32).max, np.uint32)
    nonempty = np.nonzero(counts)[0]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    i = 0
    while i < len(nonempty):  # blocks of whole documents, about _BLOCK shingles each
        j = np.searchsorted(offsets[nonempty + 1], offsets[nonempty[i]] + _BLOCK, side="right")
        j = max(j, i + 1)
        docs = nonempty[i:j]
        lo, hi = offsets[docs[0]], offsets[docs[-1] + 1]
        hv = a * hashes[None, lo:hi]
        hv += b
        hv >>= np.uint64(32)
        sig[docs] = np.minimum.reduceat(hv.astype(np.uint32), offsets[docs] - lo, axis=1).T
        i = j
    return sig


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


def redis_params(url):
    """redis://host:port/db -> redis.Redis keyword arguments (what datasketch's storage config wants)."""
    u = urlparse(url)
    return {"host": u.hostname or "localhost", "port": u.port or 6379,
            "db": int(u.path.strip("/") or 0), **({"password": u.password} if u.password else {})}


class ExactDedup:
    """First occurrence wins. In memory: a set of 8-byte keys; with redis_url, a Redis set shared by all
    workers (SADD says atomically whether the key was new)."""

    def __init__(self, redis_url="", prefix="babyllama"):
        self.seen, self.redis = {}, None
        if redis_url:
            import redis
            self.redis = redis.Redis(**redis_params(redis_url))
            self.name = f"{prefix}:exact"

    def check_and_add(self, key, doc_id):
        """None if new (and now remembered), else the id of the first document with this key."""
        if self.redis is not None:
            if self.redis.hsetnx(self.name, key, doc_id):
                return None
            return int(self.redis.hget(self.name, key))
        first = self.seen.setdefault(key, doc_id)
        return None if first == doc_id else first


class MinHashDedup:
    """MinHashLSH over the kept documents, in memory or in Redis (datasketch storage_config), plus the
    kept signatures (needed to verify candidates; a Redis hash in Redis mode, so workers see each other's).
    """

    def __init__(self, threshold=0.8, num_perm=128, seed=1, redis_url="", prefix="babyllama", lsh_threshold=None):
        from datasketch import MinHashLSH
        # LSH tuned at threshold catches only about half the pairs right at it; banding for a lower
        # lsh_threshold returns more candidates and the signature check keeps precision
        lsh_threshold = lsh_threshold or threshold
        self.threshold, self.num_perm, self.seed = threshold, num_perm, seed
        self.redis, self._lean = None, None
        if redis_url:
            import redis
            storage = {"type": "redis", "basename": f"{prefix}:lsh".encode(), "redis": redis_params(redis_url)}
            self.lsh = MinHashLSH(threshold=lsh_threshold, num_perm=num_perm, storage_config=storage)
            self.redis = redis.Redis(**redis_params(redis_url))
            self.sig_name = f"{prefix}:sig"
        else:
            self.lsh = MinHashLSH(threshold=lsh_threshold, num_perm=num_perm)
            self.sigs = {}
        self.shingle_sets = {}

    def _minhash(self, sig):
        # one LeanMinHash reused: building one per document (abc checks, copies) cost more than the query
        if self._lean is None:
            from datasketch import LeanMinHash
            self._lean = LeanMinHash(seed=self.seed, hashvalues=sig, scheme="affine32")
        self._lean.hashvalues = sig  # LSH reads only hashvalues (and len, scheme)
        return self._lean

    def _signatures(self, keys):
        if self.redis is None:
            return [self.sigs[k] for k in keys]
        return [np.frombuffer(v, np.uint32) for v in self.redis.hmget(self.sig_name, keys)]

    def candidates(self, sig):
        """Keys that LSH returns for this signature, with their estimated Jaccard."""
        keys = sorted(self.lsh.query(self._minhash(sig)))
        return [(k, float(np.mean(s == sig))) for k, s in zip(keys, self._signatures(keys))] if keys else []

    def check_and_add(self, sig, doc_id, shingles=None):
        """None if no kept document has Jaccard >= threshold (the doc is then indexed), else the id of the
        earliest such kept document. With `shingles` (the document's sorted unique shingle hashes) every LSH
        candidate is verified by exact Jaccard, in memory: the signature estimate (std ~0.035 at J=0.8
        with 128 permutations) would both miss and wrongly merge pairs near the threshold. Without them
        (and in Redis mode) the estimate decides."""
        for key, est in self.candidates(sig):
            kept = self.shingle_sets.get(key) if shingles is not None else None
            if kept is not None:
                if exact_jaccard(shingles, kept) >= self.threshold:
                    return key
            elif est >= self.threshold:
                return key
        self.lsh.insert(doc_id, self._minhash(sig), check_duplication=False)
        if self.redis is None:
            self.sigs[doc_id] = sig
            if shingles is not None:
                self.shingle_sets[doc_id] = shingles
        else:
            self.redis.hset(self.sig_name, doc_id, sig.tobytes())
        return None


class SimHashDedup:
    """simhash.SimhashIndex over the kept documents' fingerprints (in memory, per process)."""

    def __init__(self, k=3):
        from simhash import SimhashIndex
        quiet = logging.getLogger("clean_data.simhash")
        quiet.setLevel(logging.ERROR)  # the index warns about every bucket over 200 entries
        self.index = SimhashIndex([], f=64, k=k, log=quiet)
        self.k = k
        self._blocks = None

    def _keys(self, value):
        """index.get_keys, with its block offsets computed once: k+1 blocks of the 64 bits, '%x:%x'."""
        if self._blocks is None:
            offs = self.index.offsets
            self._blocks = [(o, (1 << ((offs[i + 1] if i + 1 < len(offs) else 64) - o)) - 1)
                            for i, o in enumerate(offs)]
        return ["%x:%x" % (value >> o & m, i) for i, (o, m) in enumerate(self._blocks)]

    def check_and_add(self, fp, doc_id):
        """Search the buckets the index would (same keys, same rule: distance <= k, popcount via
        int.bit_count); None and add to the index if nothing is near, else the earliest near id."""
        value = int(fp)
        keys = self._keys(value)
        near = [obj_id for key in keys for entry in self.index.bucket.get(key, ())
                for other, obj_id in [entry.split(",", 1)] if (int(other, 16) ^ value).bit_count() <= self.k]
        if near:
            return min(int(x) for x in near)
        for key in keys:  # what index.add stores
            self.index.bucket[key].add("%x,%s" % (value, doc_id))
        return None
