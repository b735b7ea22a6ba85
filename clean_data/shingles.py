"""Shingles: character n-grams (default 5) of a normalised text hashed to 64 bits, the unit every near-duplicate measure
here counts (MinHash, SimHash in dedup.py; contamination.py). "明月光照" and "照光明月" share no shingle (single
characters would call them duplicates). A text shorter than n is one shingle, itself.

Hash: a polynomial over the n code points (uint64, wrapping), then the splitmix64 finaliser, so every bit depends on
every character; computed for all positions of a chunk's documents in n vectorised numpy steps."""
import numpy as np

P = np.uint64(0x100000001B3)  # polynomial base (the FNV prime): odd, so no information is shifted out
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def mix64(x):
    """splitmix64 finaliser, vectorised (uint64 arithmetic wraps, which is what we want)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def shingle_hashes(texts, n=5):
    """64-bit hashes of the character n-grams of each text, every position (duplicates kept). Returns (hashes, counts):
    hashes text after text, counts[j] = shingles of text j."""
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
        h = h * P + cp[i:i + m]
    # keep the windows that stay inside one text: text j's windows start at starts[j] .. +counts[j]-1
    starts = np.cumsum(lengths) - lengths
    first = np.cumsum(counts) - counts  # index of text j's first shingle in the output
    idx = np.arange(counts.sum()) + np.repeat(starts - first, counts)
    return mix64(h[idx]), counts


def shingle_hashes_of(text, n=5):
    """Shingle hashes of one text (for tests and the benchmark's exact Jaccard)."""
    return shingle_hashes([text], n)[0]
