"""babyllama/token_files.py: token files that are not what they claim (another dtype, an odd byte count, ids
outside the vocabulary, empty, another tokenizer's, no meta.json) are refused with the file named."""
import json
import os

import numpy as np
import pytest

from babyllama import token_files


def write_bin(path, tokens, dtype=np.uint16, **meta):
    """A token file and the meta.json data_process.py would write beside it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.asarray(tokens, dtype=dtype).tofile(path)
    name = os.path.splitext(os.path.basename(path))[0]
    meta = {"dtype": "uint16", "vocab_size": 256, "tokenizer_sha256": "a" * 64, f"{name}_tokens": len(tokens),
            **meta}
    meta_path = os.path.join(os.path.dirname(path), "meta.json")
    old = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    with open(meta_path, "w") as f:
        json.dump({**old, **meta}, f)


def test_wrong_token_files_are_refused_with_the_file_named(tmp_path):
    good = str(tmp_path / "good" / "train.bin")
    write_bin(good, np.arange(100) % 200)
    assert len(token_files.open_bins(good)[0][0]) == 100
    cases = {
        "int32": lambda p: write_bin(p, np.arange(100) % 200, dtype=np.int32, train_tokens=100),
        "odd": lambda p: (write_bin(p, np.arange(100) % 200), open(p, "ab").write(b"\0")),
        "out_of_range": lambda p: write_bin(p, [1, 2, 300, 4]),
        "empty": lambda p: write_bin(p, []),
    }
    for name, make in cases.items():
        path = str(tmp_path / name / "train.bin")
        make(path)
        with pytest.raises(ValueError, match=os.path.basename(os.path.dirname(path))):
            token_files.open_bins(path)
    other = str(tmp_path / "other" / "train.bin")  # another tokenizer's tokens, of the same vocabulary size
    write_bin(other, np.arange(100) % 200, tokenizer_sha256="b" * 64)
    with pytest.raises(ValueError, match="other.*tokenizer"):
        token_files.open_bins(f"{good},{other}")
    os.remove(os.path.join(os.path.dirname(other), "meta.json"))
    with pytest.raises(FileNotFoundError, match="meta.json"):
        token_files.open_bins(other)
