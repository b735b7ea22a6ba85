"""Normalisation for comparison only: the dedup stages hash this form; the kept text never changes.

NFKC folds width and compatibility forms (Ａ→A, ①→1), lower() folds case, then every run of whitespace, punctuation and
symbols is removed, so "床前明月光，疑是地上霜。" and "床前明月光 疑是地上霜!" compare equal. t2s=True folds traditional characters to
simplified through OpenCC when installed (牀前明月光 matches 床前明月光)."""
import re
import unicodedata
import warnings

_NON_WORD = re.compile(r"[\W_]+")  # whitespace, punctuation, symbols: anything that is not a letter/digit
_t2s = None


def t2s_converter():
    """OpenCC's traditional→simplified converter, or None (with one warning) when OpenCC is missing."""
    global _t2s
    if _t2s is None:
        try:
            import opencc
            try:
                _t2s = opencc.OpenCC("t2s").convert
            except Exception:  # some builds want the config file name
                _t2s = opencc.OpenCC("t2s.json").convert
        except ImportError:
            warnings.warn("t2s=True but the opencc package is not installed: no traditional→simplified folding "
                          "(pip install opencc)")
            _t2s = False
    return _t2s or None


def normalize(text, t2s=False):
    """The comparison form of a document: NFKC, lower case, optional t2s, whitespace/punctuation removed."""
    text = unicodedata.normalize("NFKC", text).lower()
    if t2s:
        convert = t2s_converter()
        if convert is not None:
            text = convert(text)
    return _NON_WORD.sub("", text)
