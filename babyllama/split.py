"""The train/validation split: one deterministic rule per document, keyed by its text. Torch-free."""
import hashlib


def is_val(text, val_fraction, seed):
    """Deterministic per-document split: True when the text's keyed hash falls below val_fraction."""
    if val_fraction <= 0:
        return False
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(seed).encode())
    return int.from_bytes(h.digest(), "little") / 2.0 ** 64 < val_fraction
