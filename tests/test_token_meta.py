"""A token file's meta.json that is not JSON (cut short, overwritten, another encoding) is refused naming it, by
training's open_bins and by everything else that reads it through token_files.read_meta."""
import os
import re

import numpy as np
import pytest

from babyllama import token_files


@pytest.mark.parametrize("content", [b"", b'{"vocab_size": 1000, "dtype": "uin', b"\xff\xfe{}", b"<html>"])
def test_a_meta_json_that_is_not_json_is_named(tmp_path, content):
    np.arange(20, dtype=np.uint16).tofile(tmp_path / "train.bin")
    (tmp_path / "meta.json").write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'meta.json'}: not JSON")):
        token_files.open_bins(str(tmp_path / "train.bin"))
    with pytest.raises(ValueError, match="data_process.py"):
        token_files.read_meta(os.path.join(tmp_path, "train.bin"))
