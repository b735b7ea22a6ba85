"""Shared tiny fixtures for the SFT tests: a small tokenizer trained on a few lines written here."""
from tokenizer import Tokenizer
from tokenizer.train_tokenizer import train_tokenizer

TEXTS = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
         "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。", "请写一首题为《静夜思》的诗。《静夜思》的作者是谁？",
         "《静夜思》的作者是李白。你好，我是助手。今天天气很好。", "What is two plus two? It is four. Hello!",
         "续写：这首诗的作者是谁？王之涣孟浩然"] * 20


def tiny_tokenizer(tmp_dir):
    path = train_tokenizer(iter(TEXTS), str(tmp_dir / "tok"), 400, num_threads=1, verbose=False)
    return Tokenizer(path)
