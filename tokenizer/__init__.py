"""The tokenizer: sentencepiece BPE with byte fallback, its training (python -m tokenizer) and the chat template."""
from tokenizer.tokenizer import SPECIAL_TOKENS, StreamDecoder, Tokenizer, load_tokenizer
