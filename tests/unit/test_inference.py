"""babyllama/inference.py's checkpoint_tokenizer: where a checkpoint's tokenizer is found (--tokenizer_model, the
recorded path, the copy beside the checkpoint), each checked by the sha256 of its bytes (hashlib's, here)."""
import hashlib
import shutil

from conftest import TEXTS
import pytest

from babyllama.inference import checkpoint_tokenizer
from tokenizer import Tokenizer
from tokenizer.train_tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory):
    """(the tokenizer a checkpoint records, another one): two tiny models of other vocabularies."""
    d = tmp_path_factory.mktemp("toks")
    return [Tokenizer(train_tokenizer(iter(TEXTS), str(d / name), n, num_threads=1, verbose=False))
            for name, n in (("tok", 400), ("other", 390))]


def record(tok):
    """What a checkpoint records of its tokenizer, the sha256 computed here from the file's bytes."""
    with open(tok.model_path, "rb") as f:
        return {"tokenizer": tok.model_path, "tokenizer_sha256": hashlib.sha256(f.read()).hexdigest()}


def test_the_recorded_path_then_the_copy_beside_the_checkpoint(two_tokenizers, tmp_path):
    tok, other = two_tokenizers
    ckpt = str(tmp_path / "run" / "ckpt.pt")
    (tmp_path / "run").mkdir()
    assert checkpoint_tokenizer(record(tok), ckpt, tok.vocab_size).model_path == tok.model_path
    moved = dict(record(tok), tokenizer=str(tmp_path / "gone" / "tok.model"))  # the recorded file is not there
    shutil.copy(tok.model_path, tmp_path / "run" / "tok.model")
    found = checkpoint_tokenizer(moved, ckpt, tok.vocab_size)
    assert found.model_path == str(tmp_path / "run" / "tok.model") and found.encode(TEXTS[0]) == tok.encode(TEXTS[0])
    # the recorded path now holds another tokenizer: passed over for the copy beside
    (tmp_path / "gone").mkdir()
    shutil.copy(other.model_path, tmp_path / "gone" / "tok.model")
    assert checkpoint_tokenizer(moved, ckpt, tok.vocab_size).model_path == str(tmp_path / "run" / "tok.model")
    # given explicitly: used, checked
    assert checkpoint_tokenizer(moved, ckpt, tok.vocab_size, tok.model_path).model_path == tok.model_path


def test_another_tokenizer_or_none_is_refused_naming_the_files_and_the_option(two_tokenizers, tmp_path):
    tok, other = two_tokenizers
    ckpt = str(tmp_path / "ckpt.pt")
    with pytest.raises(SystemExit) as e:
        checkpoint_tokenizer(record(tok), ckpt, tok.vocab_size, other.model_path)
    assert other.model_path in str(e.value) and ckpt in str(e.value) and tok.model_path in str(e.value)
    assert "is not the tokenizer the model was trained with" in str(e.value)
    moved = dict(record(tok), tokenizer="out/demo/tok8k.model")
    with pytest.raises(SystemExit) as e:
        checkpoint_tokenizer(moved, ckpt, tok.vocab_size)
    for named in ("out/demo/tok8k.model", str(tmp_path / "tok8k.model"), "--tokenizer_model="):
        assert named in str(e.value)
    shutil.copy(other.model_path, tmp_path / "tok8k.model")  # a copy beside that is not the recorded tokenizer
    with pytest.raises(SystemExit, match="is not the tokenizer the model was trained with"):
        checkpoint_tokenizer(moved, ckpt, tok.vocab_size)
