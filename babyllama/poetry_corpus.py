"""The chinese-poetry corpus: its record layout (poems, ci, books of chapters -> documents; notes, prologues,
biographies, strains, tags and comments left out) and which files of its npm package are documents (data_process.py
--download=poetry fetches it). No torch here, on purpose."""
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
    """chinese-poetry layout: a record with paragraphs/para, or a list under content."""
    return isinstance(rec, dict) and ("paragraphs" in rec or "para" in rec or isinstance(rec.get("content"), list))


def _body_lines(body, depth=0):
    """Non-empty stripped lines of a paragraphs list; an item that is a part with a heading ({"subchapter": "其二",
    "paragraphs": [...]}, 千家詩) gives its heading line, then its lines."""
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
    """Document text of one chinese-poetry record: title line (first non-empty of title / rhythmic / chapter), author
    line, the paragraphs (_body_lines) one per line, empty parts skipped; "" without a non-empty paragraph."""
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
    """(docs, problems) of one chinese-poetry record, as record_to_documents returns them: a book (records under
    "content": 弟子規, 千家詩, 古文觀止...) gives a document per leaf poem/chapter, its title kept as "collection"."""
    out, problems = [], []
    _poetry_docs(rec, "", out, problems, 0)
    return out, problems


# ------------------------------------------------------------------------------------------------------
# the chinese-poetry npm package

# (glob on the path relative to dist/, reason); first match wins. The error/ rule applies unless include_error.
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
    """The chinese-poetry package root (a folder whose package.json is named chinese-poetry) that `path` is or is inside
    of (up to 4 folders up), else None."""
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
    """The document files of an extracted chinese-poetry package: every .json under root/dist (or root without dist/)
    except POETRY_SKIP_RULES and, unless include_error, quantangshi/error/ (exact id duplicates of flagged quantangshi/
    records). yudingquantangshi (another 全唐詩 edition, other variant characters) is kept. Returns (files, skipped),
    skipped = [(path, reason)]."""
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
