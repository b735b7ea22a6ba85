"""
Quality filters. Each is one small function text -> value, compared with a threshold in check(); the first
filter that fails names the reason a document is removed (and counts it in the report).

Shares are taken over the non-whitespace characters, so indentation and blank lines do not dilute them.
Defaults are loose on purpose (they should remove junk, not poems with a refrain); tune per corpus.
"""
import collections
import re
import unicodedata

DEFAULTS = dict(
    min_chars=10,              # fewer non-whitespace characters: too short to teach anything
    max_chars=200_000,         # longer: usually a dump, a table or a log
    min_text_frac=0.5,         # share of CJK or other letter characters (digits, punctuation, symbols aren't)
    max_dup_line_frac=0.5,     # share of non-empty lines that repeat an earlier line
    max_dup_ngram_frac=0.5,    # share of characters covered by a character n-gram that occurs twice or more
    dup_ngram=10,              # n of those n-grams (10 CJK characters is a long phrase to repeat by chance)
    max_symbol_frac=0.1,       # share of special symbols (Unicode S*, private use, controls, U+FFFD)
)

_SPACE = re.compile(r"\s+")
_LETTER = re.compile(r"[^\W\d_]")  # any letter: CJK ideographs, kana, hangul, Latin, ...
_NOT_WORD_OR_SPACE = re.compile(r"[^\w\s]")  # punctuation and symbols: candidates for the symbol check


def n_chars(text):
    return len(_SPACE.sub("", text))


def text_frac(text):
    """Share of letters (CJK or alphabetic) among non-whitespace characters."""
    s = _SPACE.sub("", text)
    return (len(s) - len(_LETTER.sub("", s))) / len(s) if s else 0.0


def symbol_frac(text):
    """Share of special symbols among non-whitespace characters. Punctuation (，。！) is not special."""
    s = _SPACE.sub("", text)
    if not s:
        return 0.0
    special = sum(1 for c in _NOT_WORD_OR_SPACE.findall(s)
                  if c == "\ufffd" or unicodedata.category(c)[0] in "SC")  # S*: symbols; Cc/Co/Cn: junk
    return special / len(s)


def dup_line_frac(text):
    """Share of non-empty lines that are a repeat of an earlier line (after stripping)."""
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    return 1 - len(set(lines)) / len(lines) if len(lines) > 1 else 0.0


def dup_ngram_frac(text, n=10):
    """Share of (non-whitespace) characters covered by a character n-gram that occurs more than once.
    Catches "啊啊啊啊..." and copy-pasted paragraphs that the line check misses (a single long line)."""
    s = _SPACE.sub("", text)
    if len(s) < 2 * n:
        return 0.0
    grams = [s[i:i + n] for i in range(len(s) - n + 1)]
    counts = collections.Counter(grams)
    delta = [0] * (len(s) + 1)  # difference array: +1 where a repeated n-gram starts, -1 where it ends
    for i, g in enumerate(grams):
        if counts[g] > 1:
            delta[i] += 1
            delta[i + n] -= 1
    covered, depth = 0, 0
    for d in delta[:-1]:
        depth += d
        covered += depth > 0
    return covered / len(s)


def check(text, cfg=DEFAULTS):
    """The name of the first failing filter, or None when the document passes all of them."""
    n = n_chars(text)
    if n < cfg["min_chars"]:
        return "too_short"
    if n > cfg["max_chars"]:
        return "too_long"
    if text_frac(text) < cfg["min_text_frac"]:
        return "low_text_frac"
    if symbol_frac(text) > cfg["max_symbol_frac"]:
        return "symbols"
    if dup_line_frac(text) > cfg["max_dup_line_frac"]:
        return "dup_lines"
    if dup_ngram_frac(text, cfg["dup_ngram"]) > cfg["max_dup_ngram_frac"]:
        return "dup_ngrams"
    return None


FILTER_NAMES = ("too_short", "too_long", "low_text_frac", "symbols", "dup_lines", "dup_ngrams")
