from tokenizer.tokenizer import SPECIAL_TOKENS, StreamDecoder, Tokenizer, load_tokenizer
