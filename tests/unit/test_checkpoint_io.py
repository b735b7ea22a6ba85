"""babyllama/checkpoint_io.py, the checkpoint file: a save is atomic (a writer killed half-way leaves the previous
file and no temporary one), the temporary files of killed writers are removed on the next save, and a missing
file is named; the tokenizer is copied beside a checkpoint (byte for byte, with its config, once)."""
import hashlib
import os
import subprocess
import sys

import pytest

from babyllama import checkpoint_io
from babyllama.atomic import atomic_path


def test_save_is_atomic_and_load_names_a_missing_file(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    checkpoint_io.save(path, {"iter_num": 1})

    with pytest.raises(KeyboardInterrupt):  # a save that dies half-way
        with atomic_path(path) as tmp:
            open(tmp, "wb").write(b"half a checkpoint")
            raise KeyboardInterrupt
    assert checkpoint_io.load(path)["iter_num"] == 1  # the good checkpoint is untouched
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # and no temp file is left behind
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        checkpoint_io.load(str(tmp_path / "nope.pt"))


def test_temp_files_of_killed_writers_are_removed_on_the_next_save(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    open(f"{path}.tmp.{dead.pid}", "wb").write(b"half")
    open(f"{path}.tmp.{os.getpid()}x", "wb").write(b"not ours")  # not a pid: left alone
    checkpoint_io.save(path, {"iter_num": 1})
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", f"ckpt.pt.tmp.{os.getpid()}x"]



def test_keep_tokenizer_copies_the_recorded_file_beside_the_checkpoint_once(tmp_path):
    src = tmp_path / "tok" / "tok8k.model"
    src.parent.mkdir()
    src.write_bytes(b"a sentencepiece model")
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    run = tmp_path / "run"
    copy = checkpoint_io.keep_tokenizer(str(run / "ckpt.pt"), str(src), sha)
    assert copy == str(run / "tok8k.model") and (run / "tok8k.model").read_bytes() == src.read_bytes()
    assert sorted(os.listdir(run)) == ["tok8k.model"]  # no temporary file left
    os.utime(copy, (1, 1))
    assert checkpoint_io.keep_tokenizer(str(run / "ckpt.pt"), str(src), sha) == copy
    assert os.path.getmtime(copy) == 1  # already there: not written again
    # a file that is not the one the checkpoint records, or none at all: nothing copied
    other = tmp_path / "other"
    assert checkpoint_io.keep_tokenizer(str(other / "ckpt.pt"), str(src), "0" * 64) == ""
    assert checkpoint_io.keep_tokenizer(str(other / "ckpt.pt"), str(tmp_path / "nope.model")) == ""
    assert not other.exists()


def test_keep_tokenizer_copies_a_tokenizer_json_with_its_config_from_a_folder(tmp_path):
    hf = tmp_path / "qwen"
    hf.mkdir()
    (hf / "tokenizer.json").write_text('{"model": {}}')
    (hf / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    copy = checkpoint_io.keep_tokenizer(str(tmp_path / "run" / "ckpt.dcp"), str(hf))
    assert copy == str(tmp_path / "run" / "tokenizer.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "run" / name).read_bytes() == (hf / name).read_bytes()
