from tokenizer.tokenizer import SPECIAL_TOKENS, StreamDecoder, Tokenizer
