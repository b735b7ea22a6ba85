"""Checkpoints that say what is wrong with them: an empty, truncated, bit-flipped or foreign file is refused with
its path and the damage named (never a bare EOFError or zip error, never loaded with a wrong weight); a full disk
during a save says "no space left on <folder>" and keeps the previous checkpoint; sharded (DCP) checkpoints check
extra.pt and every shard file; files without a checksum (older checkpoints) still load."""
import errno
import os
import re
import shutil
import subprocess
import sys

from conftest import ROOT, run_script
import pytest
import torch

from babyllama import checkpoint_io, dist, sharded, tensor_file
from babyllama.checkpoint_io import CheckpointError
from model import ModelArgs, Transformer

ARGS = dict(dim=32, n_layers=2, n_heads=4, vocab_size=64, max_seq_len=16)
WEIGHT = "layers.1.attention.wq.weight"


def tiny(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelArgs(**ARGS))


def save_model(path, iter_num=1, seed=0):
    model = tiny(seed)
    checkpoint_io.save(str(path), {"model": model.state_dict(), "model_args": ARGS, "iter_num": iter_num})
    return model.state_dict()


def assert_holds(path, weights, iter_num):
    ckpt = checkpoint_io.load(str(path))
    assert ckpt["iter_num"] == iter_num
    assert all(torch.equal(ckpt["model"][k], v) for k, v in weights.items())


def flip_bit_in(path, tensor, bit=3, at=100):
    """Flip one bit inside a tensor's bytes in a saved file (torch.save stores them uncompressed)."""
    raw = bytearray(open(path, "rb").read())
    offset = raw.find(tensor.numpy().tobytes()[:64])
    assert offset > 0
    raw[offset + at] ^= 1 << bit
    open(path, "wb").write(bytes(raw))


def damaged_copy(good, bad, data):
    shutil.copyfile(good, bad)
    open(bad, "wb").write(data(open(good, "rb").read()))


def test_an_empty_checkpoint_is_named_as_empty_and_the_other_still_loads(tmp_path):
    weights = save_model(tmp_path / "ckpt.pt")
    damaged_copy(tmp_path / "ckpt.pt", tmp_path / "best.pt", lambda raw: b"")
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'best.pt'}: empty")):
        checkpoint_io.load(str(tmp_path / "best.pt"))
    assert_holds(tmp_path / "ckpt.pt", weights, 1)


@pytest.mark.parametrize("keep", [10, 1000, 0.5, -22, -1])
def test_a_truncated_checkpoint_is_named_as_truncated_wherever_it_is_cut(tmp_path, keep):
    weights = save_model(tmp_path / "ckpt.pt")
    size = os.path.getsize(tmp_path / "ckpt.pt")
    cut = int(size * keep) if isinstance(keep, float) else keep % size
    damaged_copy(tmp_path / "ckpt.pt", tmp_path / "copy.pt", lambda raw: raw[:cut])
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'copy.pt'}: truncated: {cut:,} bytes")):
        checkpoint_io.load(str(tmp_path / "copy.pt"))
    assert_holds(tmp_path / "ckpt.pt", weights, 1)


def test_a_flipped_bit_in_a_weight_is_caught_by_the_checksum_naming_the_tensor(tmp_path):
    weights = save_model(tmp_path / "ckpt.pt")
    shutil.copyfile(tmp_path / "ckpt.pt", tmp_path / "copy.pt")
    flip_bit_in(tmp_path / "copy.pt", weights[WEIGHT])
    assert torch.load(tmp_path / "copy.pt", weights_only=True)["model"][WEIGHT].ne(weights[WEIGHT]).sum() == 1
    with pytest.raises(CheckpointError, match=f"copy.pt: corrupted: 1 tensor.*model/{WEIGHT}"):
        checkpoint_io.load(str(tmp_path / "copy.pt"))
    assert_holds(tmp_path / "ckpt.pt", weights, 1)


def test_a_flipped_bit_in_the_saved_fields_is_caught_by_the_zip_crc(tmp_path):
    save_model(tmp_path / "ckpt.pt")
    raw = bytearray(open(tmp_path / "ckpt.pt", "rb").read())
    raw[raw.find(b"data.pkl") + 60] ^= 4  # inside the pickle of the dict (names, iter_num, model_args)
    open(tmp_path / "copy.pt", "wb").write(bytes(raw))
    with pytest.raises(CheckpointError, match=r"copy.pt: corrupted: record .*data.pkl fails its CRC-32"):
        checkpoint_io.load(str(tmp_path / "copy.pt"))


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path):
    (tmp_path / "notes.pt").write_text("not a checkpoint at all")
    with pytest.raises(CheckpointError, match="notes.pt: not a checkpoint"):
        checkpoint_io.load(str(tmp_path / "notes.pt"))


def test_checksum_is_saved_checked_and_not_returned_and_old_files_without_one_load(tmp_path):
    state = {"model": tiny().state_dict(), "bf16": torch.ones(3, dtype=torch.bfloat16), "scalar": torch.tensor(2.0),
             "rng": [{"torch": torch.ByteTensor([1, 2])}], "iter_num": 7}
    checkpoint_io.save(str(tmp_path / "new.pt"), state)
    raw = torch.load(tmp_path / "new.pt", weights_only=True)
    assert raw["checksum"] == tensor_file.checksums(state) and "rng/0/torch" in raw["checksum"]
    back = checkpoint_io.load(str(tmp_path / "new.pt"))
    assert "checksum" not in back and torch.equal(back["bf16"], state["bf16"])
    checkpoint_io.save(str(tmp_path / "again.pt"), back)  # a loaded dict saves again (export --format=pt does)
    assert checkpoint_io.load(str(tmp_path / "again.pt"))["iter_num"] == 7
    torch.save({"model": state["model"], "iter_num": 3}, tmp_path / "old.pt")  # written before checksums
    assert checkpoint_io.load(str(tmp_path / "old.pt"))["iter_num"] == 3


def test_a_changed_shape_or_dtype_with_the_same_bytes_fails_the_checksum():
    t = torch.arange(6, dtype=torch.int32)
    sums = [tensor_file.checksums({"t": x})["t"] for x in (t, t.reshape(2, 3), t.view(torch.float32))]
    assert len(set(sums)) == 3


@pytest.mark.parametrize("raised", ["OSError", "RuntimeError over OSError"])
def test_a_full_disk_during_a_save_says_no_space_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, raised):
    weights = save_model(tmp_path / "ckpt.pt", iter_num=1)
    real_save = torch.save

    def disk_fills(obj, f, *args, **kwargs):  # torch.save into a file on a full disk: a write fails, and closing
        f.write(b"PK\x03\x04" + b"\0" * 100)  # the zip may then raise a RuntimeError during its handling
        full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if raised == "OSError":
            raise full
        try:
            raise full
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662")
    monkeypatch.setattr(torch, "save", disk_fills)
    with pytest.raises(OSError, match=re.escape(f"no space left on {tmp_path} (") + ".*bytes free.*ckpt.pt keeps its previous") as e:
        save_model(tmp_path / "ckpt.pt", iter_num=2, seed=1)
    assert e.value.errno == errno.ENOSPC
    with pytest.raises(OSError, match=re.escape(f"no space left on {tmp_path} (") + ".*fresh.pt was not written"):
        save_model(tmp_path / "fresh.pt")
    monkeypatch.setattr(torch, "save", real_save)
    assert_holds(tmp_path / "ckpt.pt", weights, 1)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]  # no temporary file left taking the space


def test_a_full_disk_while_copying_best_pt_keeps_the_previous_best(tmp_path, monkeypatch):
    save_model(tmp_path / "ckpt.pt", iter_num=2)
    best = save_model(tmp_path / "best.pt", iter_num=1, seed=1)

    def disk_fills(src, dst):
        open(dst, "wb").write(b"PK")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(shutil, "copyfile", disk_fills)
    with pytest.raises(OSError, match=re.escape(f"no space left on {tmp_path} (") + ".*best.pt keeps its previous"):
        checkpoint_io.copy(str(tmp_path / "ckpt.pt"), str(tmp_path / "best.pt"))
    assert_holds(tmp_path / "best.pt", best, 1)


# the same on a real full disk: a 192 KiB tmpfs in a private mount namespace (no root needed where user namespaces
# are allowed); the first checkpoint (~100 KiB) fits, a second one beside it does not
FULL_DISK = f"""
import errno, os, sys, torch
sys.path.insert(0, {ROOT!r})
from babyllama import checkpoint_io
d = sys.argv[1]
checkpoint_io.save(d + "/ckpt.pt", {{"w": torch.ones(25_000), "iter_num": 1}})
try:
    checkpoint_io.save(d + "/ckpt.pt", {{"w": torch.zeros(25_000), "iter_num": 2}})
except OSError as e:
    print("errno", e.errno, e)
print("kept", checkpoint_io.load(d + "/ckpt.pt")["iter_num"], sorted(os.listdir(d)))
"""


def test_a_real_full_tmpfs_says_no_space_and_keeps_the_previous_checkpoint(tmp_path):
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no user namespaces here to mount a small tmpfs in")
    d = tmp_path / "small"
    d.mkdir()
    (tmp_path / "fill.py").write_text(FULL_DISK)
    p = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=192k tmpfs {d} && "
                        f"{sys.executable} {tmp_path / 'fill.py'} {d}"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"errno {errno.ENOSPC} [Errno {errno.ENOSPC}] no space left on {d}" in p.stdout
    assert "kept 1 ['ckpt.pt']" in p.stdout


def test_export_refuses_a_checkpoint_with_a_flipped_bit_naming_it(tmp_path):
    weights = save_model(tmp_path / "ckpt.pt")
    flip_bit_in(tmp_path / "ckpt.pt", weights[WEIGHT])
    p = run_script("export.py", f"--ckpt_path={tmp_path / 'ckpt.pt'}", f"--out_dir={tmp_path / 'hf'}", check=False)
    assert p.returncode != 0
    assert f"{tmp_path / 'ckpt.pt'}: corrupted" in p.stderr
    assert not os.path.exists(tmp_path / "hf" / "model.safetensors")


# ---- sharded (DCP) checkpoints: extra.pt through the same checks, every shard file by its CRC-32 ----------------

def save_sharded(tmp_path, iter_num=2):
    model = tiny()
    opt = torch.optim.AdamW(model.parameters())
    link = str(tmp_path / "ckpt.dcp")
    sharded.save_sharded(link, model, opt, {"iter_num": iter_num, "model_args": ARGS}, dist.Run())
    return link, os.path.realpath(link), model.state_dict()


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "missing"])
def test_a_damaged_shard_file_is_named(tmp_path, damage):
    link, folder, weights = save_sharded(tmp_path)
    assert all(torch.equal(checkpoint_io.load(link)["model"][k], v) for k, v in weights.items())
    shard = os.path.join(folder, "__0_0.distcp")
    if damage == "flip":
        flip_bit_in(shard, weights[WEIGHT])
    elif damage == "missing":
        os.remove(shard)
    else:
        open(shard, "r+b").truncate(0 if damage == "empty" else os.path.getsize(shard) // 2)
    named = os.path.join(link, "__0_0.distcp")  # by the path the user gave
    with pytest.raises(CheckpointError, match=re.escape(named + (" not found" if damage == "missing" else ": corrupted"))):
        checkpoint_io.load(link)


def test_a_damaged_extra_pt_of_a_sharded_checkpoint_is_named(tmp_path):
    link, folder, _ = save_sharded(tmp_path)
    open(os.path.join(folder, "extra.pt"), "r+b").truncate(100)
    with pytest.raises(CheckpointError, match=re.escape(os.path.join(link, "extra.pt") + ": truncated")):
        checkpoint_io.load(link)
