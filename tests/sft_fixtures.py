"""Shared tiny fixtures for the SFT tests: a small tokenizer trained on a few lines written here."""
import json

import torch

from babyllama import checkpoint as ck
from model import ModelArgs, Transformer
from tokenizer import Tokenizer
from tokenizer.train_tokenizer import train_tokenizer

TEXTS = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
         "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。", "请写一首题为《静夜思》的诗。《静夜思》的作者是谁？",
         "《静夜思》的作者是李白。你好，我是助手。今天天气很好。", "What is two plus two? It is four. Hello!",
         "续写：这首诗的作者是谁？王之涣孟浩然"] * 20


def tiny_tokenizer(tmp_dir):
    path = train_tokenizer(iter(TEXTS), str(tmp_dir / "tok"), 400, num_threads=1, verbose=False)
    return Tokenizer(path)


def write_chat_files(d):
    """Folder d with a tiny base checkpoint (base.pt) and its tokenizer, conversations whose replies differ in
    length (train.jsonl) and preference pairs (pairs.jsonl). Returns d."""
    tok = tiny_tokenizer(d)
    args = dict(dim=64, n_layers=2, n_heads=4, vocab_size=tok.vocab_size, max_seq_len=64)
    torch.manual_seed(0)
    ck.save(str(d / "base.pt"), {"model": Transformer(ModelArgs(**args)).state_dict(), "model_args": args,
                                 "iter_num": 0, "config": {}, "tokenizer": tok.model_path,
                                 "tokenizer_sha256": tok.sha256()})
    U = lambda c: {"role": "user", "content": c}
    A = lambda c: {"role": "assistant", "content": c}
    convs = [[U("你好"), A("你好。")], [U("《静夜思》的作者是谁？"), A("《静夜思》的作者是李白。")],
             [U("续写：床前明月光，"), A("疑是地上霜。举头望明月，低头思故乡。")],
             [U("请写一首题为《登鹳雀楼》的诗。"), A("白日依山尽，黄河入海流。欲穷千里目，更上一层楼。")]]
    with open(d / "train.jsonl", "w", encoding="utf-8") as f:
        for c in convs:
            f.write(json.dumps({"messages": c, "system": None, "source": "t"}, ensure_ascii=False) + "\n")
    pairs = [{"prompt": "你好", "chosen": "你好。", "rejected": "好。"},
             {"prompt": "《静夜思》的作者是谁？", "chosen": "《静夜思》的作者是李白。", "rejected": "王之涣。"},
             {"prompt": "续写：床前明月光，", "chosen": "疑是地上霜。举头望明月，低头思故乡。", "rejected": "疑是地上霜。"},
             {"prompt": "请写一首题为《登鹳雀楼》的诗。", "chosen": "白日依山尽，黄河入海流。", "rejected": "白日依山尽。白日依山尽。"}]
    with open(d / "pairs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
    return d
