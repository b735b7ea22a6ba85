"""babyllama/inference.py's checkpoint_tokenizer: where a checkpoint's tokenizer is found (--tokenizer_model, the
recorded path, the copy beside the checkpoint), each checked by the sha256 of its bytes (hashlib's, here); a
tokenizer.json copied beside with its tokenizer_config.json gives tokenizers' ids and the config's eos."""
import hashlib
import shutil

from conftest import TEXTS
import pytest
import tokenizers

from babyllama.checkpoint_io import keep_tokenizer
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


def test_a_tokenizer_json_folder_travels_with_its_config(tmp_path):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    hf.train_from_iterator(TEXTS, tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>"], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text('{"eos_token": "<|im_start|>"}')  # not the first special: only
    tok = Tokenizer(str(hf_dir))                                                   # the config says it is eos
    ckpt = dict(record(tok), tokenizer=str(hf_dir))  # as data_process records a folder
    keep_tokenizer(str(tmp_path / "run" / "ckpt.pt"), str(hf_dir), ckpt["tokenizer_sha256"])
    shutil.rmtree(hf_dir)
    found = checkpoint_tokenizer(ckpt, str(tmp_path / "run" / "ckpt.pt"), tok.vocab_size)
    assert found.model_path == str(tmp_path / "run" / "tokenizer.json")
    assert found.eos_id == hf.token_to_id("<|im_start|>") and found.encode(TEXTS[1]) == hf.encode(TEXTS[1]).ids
