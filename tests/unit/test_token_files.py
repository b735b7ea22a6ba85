"""babyllama/token_files.py: token files that are not what they claim (another dtype, an odd byte count, ids
outside the vocabulary, empty, another tokenizer's, no meta.json or one that is not JSON, a meta.json dtype that is
not the file's or cannot hold its vocabulary) are refused with the file named; uint32 files (a vocabulary over
65,535) are read in meta.json's dtype and an old meta.json without one means uint16; the sampler draws every window
of a file, files in proportion to their windows."""
import json
import os
import re

import numpy as np
import pytest
import torch

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


@pytest.mark.parametrize("content", [b"", b'{"vocab_size": 1000, "dtype": "uin', b"\xff\xfe{}", b"<html>"])
def test_a_meta_json_that_is_not_json_is_named(tmp_path, content):
    np.arange(20, dtype=np.uint16).tofile(tmp_path / "train.bin")
    (tmp_path / "meta.json").write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'meta.json'}: not JSON")):
        token_files.open_bins(str(tmp_path / "train.bin"))
    with pytest.raises(ValueError, match="data_process.py"):
        token_files.read_meta(os.path.join(tmp_path, "train.bin"))


T = 8  # max_seq_len: a window is T + 1 tokens


def token_file(d, name, n, first=0, dtype="uint16", vocab_size=1000):
    """n tokens first..first+n-1 (a token's id tells its position) as dtype and the meta.json beside them."""
    os.makedirs(d, exist_ok=True)
    np.arange(first, first + n, dtype=dtype).tofile(os.path.join(d, name))
    meta_path = os.path.join(d, "meta.json")
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {"dtype": dtype, "vocab_size": vocab_size}
    meta.setdefault("tokens_per_file", {})[name] = n
    json.dump(meta, open(meta_path, "w"))
    return os.path.join(d, name)


def starts(bins, steps, batch_size=64):
    """The first token (= start position) of every row drawn over `steps` steps, and the largest target."""
    xs, top = [], 0
    for step in range(steps):
        x, y = token_files.get_batch(bins, batch_size, T, seed=0, step=step, micro_step=0, device="cpu")
        assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:, -1], x[:, -1] + 1)  # contiguous windows
        xs += x[:, 0].tolist()
        top = max(top, int(y.max()))
    return xs, top


def test_every_window_start_is_drawn_and_the_last_token_is_a_target(tmp_path):
    n = 50
    bins, _, _ = token_files.open_bins(token_file(tmp_path, "train.bin", n), min_tokens=T + 1)
    drawn, top = starts(bins, steps=20)  # 1,280 draws of 42 starts: a given start is missed with p ~ 1e-13
    assert set(drawn) == set(range(n - T))  # 0..n - T - 1, i.e. 0..n - (T + 1) inclusive
    assert top == n - 1


def test_a_file_of_exactly_one_window_gives_that_window(tmp_path):
    bins, _, _ = token_files.open_bins(token_file(tmp_path, "train.bin", T + 1), min_tokens=T + 1)
    x, y = token_files.get_batch(bins, 4, T, seed=0, step=0, micro_step=0, device="cpu")
    assert x.tolist() == [list(range(T))] * 4 and y.tolist() == [list(range(1, T + 1))] * 4


def test_a_file_shorter_than_one_window_is_refused(tmp_path):
    path = token_file(tmp_path, "train.bin", T)
    with pytest.raises(ValueError, match=f"{T} tokens, fewer than the {T + 1:,}"):
        token_files.open_bins(path, min_tokens=T + 1)
    with pytest.raises(ValueError, match=f"shorter than max_seq_len \\+ 1 = {T + 1}"):
        token_files.get_batch([np.arange(T, dtype=np.uint16)], 2, T, 0, 0, 0, "cpu")


def test_files_are_picked_in_proportion_to_their_windows(tmp_path):
    one = token_file(tmp_path, "one.bin", T + 1, first=500)  # 1 window
    nine = token_file(tmp_path, "nine.bin", T + 9)  # 9 windows
    bins, _, _ = token_files.open_bins(f"{one},{nine}", min_tokens=T + 1)
    firsts = torch.cat([token_files.get_batch(bins, 100, T, seed=1, step=step, micro_step=0, device="cpu")[0][:, 0]
                        for step in range(40)])
    # one.bin's share: 1 window of 10 (by length it would be 9 tokens of 26); sd over 4,000 rows ~0.005
    assert abs((firsts == 500).float().mean().item() - 0.1) < 0.02
    assert set(firsts[firsts != 500].tolist()) == set(range(9))


class Recorder(torch.nn.Module):
    """A stand-in model for estimate_loss: remembers its inputs, returns a loss of 1."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, y, return_logits=False):
        self.seen.append(x)
        return None, torch.tensor(1.0)


def test_estimate_loss_reads_the_same_windows_a_file_of_one_window_included(tmp_path):
    bins, _, _ = token_files.open_bins(token_file(tmp_path, "val.bin", T + 1), min_tokens=T + 1)
    model = Recorder()
    loss = token_files.estimate_loss(model, bins, 2, T, eval_iters=3, device="cpu", autocast_ctx=torch.no_grad())
    assert loss == 1.0 and len(model.seen) == 3
    assert all(x.tolist() == [list(range(T))] * 2 for x in model.seen)


# ---- uint32 token files: a vocabulary over 65,535 ids ---------------------------------------------------------

BIG = 70_000  # a vocabulary that does not fit uint16 (Llama 3's 128,256 and Qwen2's 151,646 do not either)


def test_a_uint32_file_is_sampled_with_its_ids_above_uint16(tmp_path):
    first = 65_530  # windows cross 65,535 -> 65,536, where a uint16 reading would wrap to 0
    bins, _, meta = token_files.open_bins(token_file(tmp_path, "train.bin", 50, first, "uint32", BIG), min_tokens=T + 1)
    assert bins[0].dtype == np.uint32 and len(bins[0]) == 50 and meta["dtype"] == "uint32"
    drawn, top = starts(bins, steps=20)  # the contiguity checks in starts() fail on any id read wrong
    assert set(drawn) == set(range(first, first + 50 - T)) and top == first + 49
    model = Recorder()
    token_files.estimate_loss(model, bins, 2, T, eval_iters=2, device="cpu", autocast_ctx=torch.no_grad())
    assert all(int(x.min()) >= first and int(x.max()) < first + 50 for x in model.seen)


def test_an_old_meta_json_without_dtype_means_uint16(tmp_path):
    path = token_file(tmp_path, "train.bin", 20, first=100)
    meta = json.load(open(tmp_path / "meta.json"))
    del meta["dtype"]
    json.dump(meta, open(tmp_path / "meta.json", "w"))
    bins, _, _ = token_files.open_bins(path)
    assert bins[0].dtype == np.uint16 and bins[0].tolist() == list(range(100, 120))


def test_a_meta_json_dtype_that_is_not_the_files_is_refused_naming_file_and_field(tmp_path):
    # a uint32 file under a meta.json saying uint16 (or saying nothing: uint16): twice the bytes it counts
    for name, meta_dtype in (("says16", {"dtype": "uint16"}), ("old", {})):
        path = str(tmp_path / name / "train.bin")
        os.makedirs(os.path.dirname(path))
        np.arange(100, dtype=np.uint32).tofile(path)
        json.dump({**meta_dtype, "vocab_size": 1000, "tokens_per_file": {"train.bin": 100}},
                  open(os.path.join(os.path.dirname(path), "meta.json"), "w"))
        with pytest.raises(ValueError, match=re.escape(path) + ".*400 bytes but meta.json counts 100 uint16 tokens"
                                             ".*meta.json's dtype"):
            token_files.open_bins(path)
    # a uint16 file under a meta.json saying uint32: half the bytes it counts, or not whole uint32 ids
    path = token_file(tmp_path / "says32", "train.bin", 100, dtype="uint16")
    meta = json.load(open(tmp_path / "says32" / "meta.json"))
    json.dump({**meta, "dtype": "uint32"}, open(tmp_path / "says32" / "meta.json", "w"))
    with pytest.raises(ValueError, match=re.escape(path) + ".*200 bytes but meta.json counts 100 uint32 tokens"):
        token_files.open_bins(path)
    np.arange(101, dtype=np.uint16).tofile(path)
    with pytest.raises(ValueError, match=re.escape(path) + ": 202 bytes, not a whole number of uint32 tokens"):
        token_files.open_bins(path)


@pytest.mark.parametrize("dtype, vocab_size, why", [("int64", 1000, "token files are uint16 or uint32"),
                                                    ("uint16", BIG, "cannot hold the ids of vocab_size 70000")])
def test_a_meta_json_dtype_that_cannot_be_is_refused_naming_the_meta_json_and_field(tmp_path, dtype, vocab_size, why):
    path = token_file(tmp_path, "train.bin", 20, dtype="uint32", vocab_size=vocab_size)
    meta = json.load(open(tmp_path / "meta.json"))
    json.dump({**meta, "dtype": dtype}, open(tmp_path / "meta.json", "w"))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'meta.json'}: dtype ") + f".*{why}"):
        token_files.open_bins(path)


def test_mixing_weights_give_each_file_its_share_of_tokens_whatever_its_length(tmp_path):
    short = token_file(tmp_path, "short.bin", T + 1, first=500)  # 1 window
    long = token_file(tmp_path, "long.bin", T + 99)  # 99 windows: 99% of the tokens by length
    bins, _, _ = token_files.open_bins(f"{short},{long}", min_tokens=T + 1)
    rows = torch.cat([token_files.get_batch(bins, 100, T, seed=1, step=step, micro_step=0, device="cpu",
                                            weights=[0.3, 0.7])[0] for step in range(40)])
    # 4,000 windows of T tokens each: the short file's tokens are 30% of them (sd ~0.007), not 1%
    assert abs((rows[:, 0] == 500).float().mean().item() - 0.3) < 0.03
    with_weights = token_files.get_batch(bins, 8, T, seed=1, step=0, micro_step=0, device="cpu", weights=[0, 1])[0]
    assert not (with_weights[:, 0] == 500).any()  # a weight of 0 leaves a file out
