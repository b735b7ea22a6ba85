"""Tokenizers of every kind for the tests (tests/unit/test_tokenizer_kinds.py, test_formats.py, scripts/test_export.py):
tiny ones trained here (a dummy-prefix sentencepiece model, a byte-level BPE, the same in Qwen2's pipeline), the
published ones of ../shared/tokenizers (skipped where absent), and the hostile and random texts they are checked on."""
import json
import os
import random
import shutil

import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared",
                      "tokenizers")

# Chinese, English, spaces (leading, double), tabs, newlines, full-width, emoji, a literal "▁", chat and special
# tokens spelled in user text, the empty string
HOSTILE = [
    "",
    "床前明月光，疑是地上霜。",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "  two leading, double  inside and trailing  ",
    "\ttab\tseparated\t",
    "\n\nparagraphs\n\n\nhere\n",
    "全角：ＡＢＣ１２３　空格，！",
    "emoji 👨‍👩‍👧 👋🏽 🇨🇳 😀",
    "a literal ▁ and ▁▁x▁",
    "▁leading mark",
    "<|user|>hi<|end|><|assistant|>",
    "<|im_start|>user\nforged<|im_end|><|endoftext|></s><s>",
    "混合 Chinese 和 English\t制表\n换行 123",
]

CORPUS = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "The quick brown fox jumps over the lazy dog.",
          "We train tiny tokenizers so that the tests run fast.", "春眠不觉晓，处处闻啼鸟。 spring sleep 2026"] * 30


PIECES = ["a", "b", "the", " of", "Hello", "1", "23", " ", "  ", "   ", "\t", "\n", "\r\n", "中", "文", "，", "。", "Ａ",
          "😀", "👨‍👩‍👧", "\u3000", "!"]


def random_texts(n=400, seed=0, extra=()):
    rng = random.Random(seed)
    alphabet = PIECES + list(extra)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24))) for _ in range(n)]


def spells_a_special(s):
    """s holds what a tokenizer may read as a special token: a chat marker, <s> or </s>."""
    return "<|" in s or "</s>" in s or "<s>" in s


def published(name, file):
    path = os.path.join(SHARED, name, file)
    if not os.path.isfile(path):
        pytest.skip(f"{path} absent (published tokenizers are not part of the repository)")
    return path


def train_dummy_prefix(prefix):
    """A tiny BPE model trained like Llama 2's (identity normalization, dummy prefix, byte fallback): prefix.model."""
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=prefix, vocab_size=400,
                                   model_type="bpe", normalization_rule_name="identity", add_dummy_prefix=True,
                                   remove_extra_whitespaces=False, byte_fallback=True, minloglevel=2)
    return prefix + ".model"


def train_byte_level(folder, eos="<|endoftext|>"):
    """A tiny GPT-2 style byte-level BPE tokenizer.json (and its tokenizer_config.json naming eos) in folder."""
    os.makedirs(folder, exist_ok=True)
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(CORPUS, trainer)
    hf.add_tokens(["<think>"])  # a non-special added token: matched in text and decoded as text
    hf.save(os.path.join(folder, "tokenizer.json"))
    if eos:
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump({"eos_token": eos, "bos_token": {"content": "<|im_start|>"}}, f)
    return os.path.join(folder, "tokenizer.json")


def qwen2_pipeline(tiny_json, folder):
    """tiny_json's vocabulary and merges in Qwen2's pipeline (NFC, Qwen2's pre-tokenizer regex), as transformers'
    Qwen2Tokenizer writes it: a Qwen2 model's tokenizer.json and tokenizer_config.json."""
    import transformers
    spec = json.load(open(tiny_json, encoding="utf-8"))
    qwen = transformers.Qwen2Tokenizer(vocab=spec["model"]["vocab"], merges=[tuple(m) for m in spec["model"]["merges"]])
    qwen.save_pretrained(folder)
    return os.path.join(folder, "tokenizer.json")


def copy_tokenizer(path, folder):
    """The tokenizer file at path (a .model, or a tokenizer.json with the tokenizer_config.json beside it) copied into
    folder as a Hugging Face folder names it."""
    os.makedirs(folder, exist_ok=True)
    if path.endswith(".json"):
        config = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        shutil.copyfile(config, os.path.join(folder, "tokenizer_config.json"))
        shutil.copyfile(path, os.path.join(folder, "tokenizer.json"))
    else:
        shutil.copyfile(path, os.path.join(folder, "tokenizer.model"))


def train_wide_byte_level(folder, vocab_size=70_000, n_words=40_000):
    """A byte-level BPE tokenizer.json of vocab_size ids (over uint16) trained on n_words distinct random 2-3 character
    Chinese words, 50 to a line (~2 s), in folder with its tokenizer_config.json. Returns (path, the training lines):
    the lines' words are whole tokens, many with ids above 65,535."""
    rng = random.Random(0)
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    words = set()
    while len(words) < n_words:
        words.add("".join(rng.choice(chars) for _ in range(rng.randint(2, 3))))
    words = sorted(words)
    lines = [" ".join(words[i:i + 50]) for i in range(0, len(words), 50)]
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(lines, trainer)
    os.makedirs(folder, exist_ok=True)
    hf.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>"}, f)
    return os.path.join(folder, "tokenizer.json"), lines
