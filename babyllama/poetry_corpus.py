"""
The chinese-poetry corpus: its record layout (poems, ci, books of chapters -> documents) and which files of its
npm package are documents (data_process.py --download=poetry fetches the package).

Record layout, detected when a record has "paragraphs" (or "para", or a list "content"): text = title line +
author line + the paragraphs, joined with "\n", empty parts skipped. The title is the first non-empty of
title / rhythmic / chapter. Notes, prologues, biographies, strains, tags and comments are not part of the
document. A "content" list of records (mengxue books such as 弟子規, 千家詩, 古文觀止) is walked recursively
and every leaf poem/chapter is its own document, with the book's title kept as metadata "collection".

The npm package holds non-document JSON too: poetry_document_files() picks the files and
names every file it leaves out with the reason (author lists, 平仄 strains, rankings, the quantangshi/error/
folder, ...). See POETRY_SKIP_RULES. readers.py applies both to any folder that is or holds the package.

No torch here, on purpose.
"""
import fnmatch
import json
import os

from babyllama.records import format_of

POETRY_TITLE_FIELDS = ("title", "rhythmic", "chapter")
POETRY_BODY_FIELDS = ("paragraphs", "para", "content")
POETRY_DIRNAME = "chinese-poetry"


# ------------------------------------------------------------------------------------------------------
# records -> documents

def _clean_part(value):
    return value.strip() if isinstance(value, str) else ""


def is_poetry_record(rec):
    """chinese-poetry layout: a record with paragraphs/para, or with a list under content."""
    return isinstance(rec, dict) and ("paragraphs" in rec or "para" in rec or isinstance(rec.get("content"), list))


def _body_lines(body, depth=0):
    """Non-empty stripped lines of a paragraphs list. An item may itself be a part with a heading
    ({"subchapter": "其二", "paragraphs": [...]}, as in 千家詩 multi-part poems): heading line, then its
    lines."""
    if isinstance(body, str):
        body = [body]
    if not isinstance(body, list) or depth > 4:
        return []
    lines = []
    for item in body:
        if isinstance(item, str):
            if item.strip():
                lines.append(item.strip())
        elif isinstance(item, dict):
            sub = _body_lines(next((item[k] for k in POETRY_BODY_FIELDS if k in item), None), depth + 1)
            if sub:
                head = next((t for t in (_clean_part(item.get(k)) for k in ("subchapter",) + POETRY_TITLE_FIELDS)
                             if t), "")
                lines += ([head] if head else []) + sub
    return lines


def poetry_text(rec):
    """Document text of one chinese-poetry record: title line, author line, then the paragraphs, joined
    with "\n", empty parts skipped. Title = first non-empty of title / rhythmic / chapter. A paragraphs
    item that is itself a part ({"subchapter": "其一", "paragraphs": [...]}) contributes its heading
    line and its lines. Returns "" when there is no non-empty paragraph (a title alone is no document)."""
    body = next((rec[k] for k in POETRY_BODY_FIELDS if k in rec), None)
    lines = _body_lines(body)
    if not lines:
        return ""
    title = next((t for t in (_clean_part(rec.get(k)) for k in POETRY_TITLE_FIELDS) if t), "")
    author = _clean_part(rec.get("author"))
    return "\n".join([p for p in (title, author) if p] + lines)


def _poetry_docs(rec, collection, out, problems, depth):
    if depth > 8:
        problems.append(("nested too deep", ""))
        return
    meta = {}
    title = next((t for t in (_clean_part(rec.get(k)) for k in POETRY_TITLE_FIELDS) if t), "")
    children = [c for c in (rec.get("content") if isinstance(rec.get("content"), list) else [])
                if isinstance(c, dict)]
    if children:  # a book: walk its chapters; a book may also have its own paragraphs (handled below)
        sub = f"{collection}·{title}" if collection and title else (collection or title)
        for child in children:
            _poetry_docs(child, sub, out, problems, depth + 1)
        if "paragraphs" not in rec and "para" not in rec:
            return
        rec = {k: v for k, v in rec.items() if k != "content"}
    text = poetry_text(rec)
    if not text:
        problems.append(("empty paragraphs", f"title {title!r}" if title else ""))
        return
    if title:
        meta["title"] = title
    author = _clean_part(rec.get("author"))
    if author:
        meta["author"] = author
    if collection:
        meta["collection"] = collection
    out.append({"text": text, **meta})


def poetry_documents(rec):
    """(docs, problems) of one chinese-poetry record, as record_to_documents returns them: a book (a list of
    records under "content") gives one document per leaf poem/chapter, its title kept as "collection"."""
    out, problems = [], []
    _poetry_docs(rec, "", out, problems, 0)
    return out, problems


# ------------------------------------------------------------------------------------------------------
# the chinese-poetry npm package

# (glob on the path relative to dist/, reason). First match wins. The error/ folder rule applies only
# when include_error is False.
POETRY_SKIP_RULES = (
    ("strains/*", "strains: 平仄 tone patterns keyed by poem id, not text"),
    ("rank/*", "rank: search-engine hit counts per poem, not text"),
    ("*/author.*.json", "author biography list"),
    ("*/authors.*.json", "author biography list"),
    ("*/authors.json", "author biography list"),
    ("quantangshi/表面结构字.json", "glyph-structure lookup table, not text"),
    ("wudaishici/nantang/intro.json", "description of the collection, not a document"),
)
POETRY_ERROR_RULE = ("quantangshi/error/*",
                     "quantangshi/error: records flagged by the maintainers (tofu □, dubious content); "
                     "99.9% are copies (same id) of records in quantangshi/")


def find_poetry_package(path):
    """The chinese-poetry package root (folder with package.json named chinese-poetry) that `path` is or
    is inside of (looking up to 4 folders up), else None."""
    d = os.path.abspath(path)
    for _ in range(5):
        pj = os.path.join(d, "package.json")
        if os.path.isfile(pj):
            try:
                with open(pj, encoding="utf-8") as f:
                    if json.load(f).get("name") == "chinese-poetry":
                        return d
            except (OSError, ValueError, AttributeError):
                pass
            return None
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    return None


def _walk(directory):
    """Supported files under directory, recursively, sorted, hidden files/folders skipped."""
    out = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".") and format_of(f)]
    return sorted(out)


def poetry_document_files(root, include_error=False):
    """The document files of an extracted chinese-poetry package: every .json under root/dist (or
    root itself when it has no dist/) except POETRY_SKIP_RULES and, unless include_error, the
    quantangshi/error/ folder, which copies flagged records of quantangshi/ (cross-file dedup is a later
    stage, but these are exact id duplicates, so they stay out by default). yudingquantangshi (another
    edition of 全唐詩, mostly in different variant characters) is kept. package.json, README and LICENSE
    sit outside dist/ and are never read. Returns (files, skipped) with skipped = [(path, reason)]."""
    dist = os.path.join(root, "dist")
    dist = dist if os.path.isdir(dist) else root
    rules = POETRY_SKIP_RULES + (() if include_error else (POETRY_ERROR_RULE,))
    files, skipped = [], []
    for path in _walk(dist):
        rel = os.path.relpath(path, dist).replace(os.sep, "/")
        if not rel.endswith(".json") or rel == "package.json":
            continue
        reason = next((r for pat, r in rules if fnmatch.fnmatchcase(rel, pat)), None)
        if reason:
            skipped.append((path, reason))
        else:
            files.append(path)
    return files, skipped


            # symlinks, hard links, devices: not extracted


