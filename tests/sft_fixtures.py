"""The tiny tokenizer's old import path, kept only for tests/test_eval.py, test_serve.py, test_export.py and
test_rl.py until they move into tests/unit and tests/scripts: the helpers themselves are in conftest.py."""
from conftest import tiny_tokenizer

__all__ = ["tiny_tokenizer"]
