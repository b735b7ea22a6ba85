"""babyllama/checkpoint_io.py, the checkpoint file: a save is atomic (a writer killed half-way leaves the previous
file and no temporary one), the temporary files of killed writers are removed on the next save, and a missing
file is named."""
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

