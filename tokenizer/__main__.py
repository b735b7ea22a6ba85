"""python -m tokenizer --input=... --vocab_size=8000 --model_prefix=out/tok: train the project's tokenizer
(tokenizer/train_tokenizer.py; its globals are the settings, overridden by config files and --key=value)."""
from babyllama.configurator import run_main
from tokenizer import train_tokenizer

run_main(vars(train_tokenizer), train_tokenizer.main)
