"""The tokenizer: its kinds behind one Tokenizer interface, training ours (python -m tokenizer), the chat template."""
from tokenizer.tokenizer import SPECIAL_TOKENS, StreamDecoder, Tokenizer, load_tokenizer
