"""Streaming corpus readers: files, directories or globs in, one dict per document out.

    errors = ReadErrors()
    for doc in iter_documents(["data/chinese-poetry", "data/extra/*.jsonl"], errors=errors):
        doc["text"], doc["source"]          # plus a little metadata: "line", "title", "author", "id" ...
    print(errors.report())

Formats by extension (.gz read through gzip): .jsonl / .ndjson, .json and .parquet are read as records (records.py) and
turned into documents (record_to_documents); .txt gives a document per line or paragraph (read_txt). Nothing is dropped
silently: skips are counted and named in a ReadErrors; only an unreadable file raises. No torch, on purpose."""
import glob
import os

from babyllama.poetry_corpus import find_poetry_package, is_poetry_record, poetry_document_files, poetry_documents
from babyllama.records import (SUFFIXES, ReadErrors, decode_line, format_of, iter_records, open_binary,
                               parquet_file)

TEXT_FIELDS = ("text", "content", "completion", "output", "body", "response", "answer", "article",
               "document", "passage", "story", "contents", "raw_content", "markdown", "txt")
WRAPPER_FIELDS = ("data", "rows", "records", "items", "documents", "docs")  # {"data": [record, ...]}


# ------------------------------------------------------------------------------------------------------
# records -> documents

def _as_text(value):
    """A string, or a list of strings joined with newlines; None for anything else."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    return None


def record_to_documents(rec, text_field=None):
    """One parsed record -> (docs, problems): docs [{"text", maybe "title"/"author"/"collection"/"id"}], problems
    [(reason, detail)] for the parts that gave no document. The text: with text_field, that field (a list of strings
    joined with newlines); a chinese-poetry record ("paragraphs", "para" or a list "content"): title + author lines +
    the paragraphs, a book's chapters each a document (poetry_corpus.py); else the first of TEXT_FIELDS present."""
    if isinstance(rec, str):
        return [{"text": rec}], []
    if not isinstance(rec, dict):
        return [], [("not an object", type(rec).__name__)]
    if text_field:
        if text_field not in rec:
            return [], [("missing text field", f"{text_field!r}; keys: {', '.join(list(rec)[:8])}")]
        value = rec[text_field]
        if value is None:
            return [], [("null text", text_field)]
        text = _as_text(value)
        if text is None:
            return [], [("text field not a string", f"{text_field} is {type(value).__name__}")]
        return [_with_id({"text": text}, rec)], []
    if is_poetry_record(rec):
        return poetry_documents(rec)
    if isinstance(rec.get("messages"), list) and all(isinstance(m, dict) for m in rec["messages"]):
        # a conversation (sft_data_process.py's unified form): its turns, one after another
        return [{"text": "\n".join(str(m.get("content", "")) for m in rec["messages"])}], []
    for key in TEXT_FIELDS:
        if key in rec:
            value = rec[key]
            if value is None:
                return [], [("null text", key)]
            text = _as_text(value)
            if text is not None:
                return [_with_id({"text": text}, rec)], []
    for key in WRAPPER_FIELDS:  # {"data": [records]} as some .json dumps have
        if isinstance(rec.get(key), list):
            out, problems = [], []
            for sub in rec[key]:
                d, p = record_to_documents(sub, text_field)
                out += d
                problems += p
            return out, problems
    return [], [("no text field", "keys: " + ", ".join(list(rec)[:8]))]


def _with_id(doc, rec):
    rid = rec.get("id")
    if isinstance(rid, (str, int)) and not isinstance(rid, bool):
        doc["id"] = rid
    return doc


# ------------------------------------------------------------------------------------------------------
# per-format readers: each yields documents, counts its file (errors.files_read) and reports problems to `errors`

def _emit(rec, text_field, source, line, errors):
    """The documents of one record, each with its source and line; the parts that gave none go to errors."""
    docs, problems = record_to_documents(rec, text_field)
    for reason, detail in problems:
        errors.add(source, line, reason, detail)
    for d in docs:
        d["source"] = source
        d["line"] = line
        yield d


def read_records(path, source, text_field=None, errors=None):
    """Documents of a .jsonl, .json or .parquet file, record by record (what is skipped: iter_records)."""
    errors = ReadErrors() if errors is None else errors
    for line, rec in iter_records(path, errors, source):
        yield from _emit(rec, text_field, source, line, errors)


def read_txt(path, source, errors=None, txt_mode="line"):
    """One document per non-blank line, or per blank-line-separated paragraph (txt_mode="paragraph"), line ends removed,
    otherwise verbatim. A paragraph's "line" is the line it starts on."""
    if txt_mode not in ("line", "paragraph"):
        raise ValueError(f"txt_mode must be 'line' or 'paragraph', not {txt_mode!r}")
    errors = ReadErrors() if errors is None else errors
    errors.files_read += 1
    para, start = [], None
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = decode_line(raw, source, lineno, errors)
            if line is None:
                continue
            line = line.rstrip("\r\n")
            if txt_mode == "line":
                if line.strip():
                    yield {"text": line, "source": source, "line": lineno}
                continue
            if line.strip():
                if not para:
                    start = lineno
                para.append(line)
            elif para:
                yield {"text": "\n".join(para), "source": source, "line": start}
                para = []
    if para:
        yield {"text": "\n".join(para), "source": source, "line": start}


def read_parquet(path, source, text_field=None, errors=None, batch_size=1024):
    """Parquet via pyarrow iter_batches. With a text column (text_field or one of TEXT_FIELDS) only that column is
    decoded; otherwise whole rows go through record_to_documents. line = row number (from 1)."""
    errors = ReadErrors() if errors is None else errors
    pf = parquet_file(path)
    names = pf.schema_arrow.names
    field = text_field if text_field else next((n for n in TEXT_FIELDS if n in names), None)
    if field is None:
        yield from read_records(path, source, None, errors)
        return
    errors.files_read += 1
    if field not in names:
        errors.add(source, None, "missing text field", f"{text_field!r}; columns: {', '.join(names[:8])}")
        return
    row = 0
    for batch in pf.iter_batches(batch_size=batch_size, columns=[field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if value is None:
                errors.add(source, row, "null text", field)
                continue
            text = _as_text(value)
            if text is None:
                errors.add(source, row, "text field not a string", f"{field} is {type(value).__name__}")
                continue
            yield {"text": text, "source": source, "line": row}


def read_file(path, source=None, text_field=None, errors=None, txt_mode="line"):
    """Documents of one file, format from its extension. Raises ValueError for an unsupported one."""
    errors = ReadErrors() if errors is None else errors
    source = str(path) if source is None else source
    fmt = format_of(path)
    if fmt is None:
        raise _unsupported(path)
    if fmt in ("jsonl", "json"):
        yield from read_records(path, source, text_field, errors)
    elif fmt == "parquet":
        yield from read_parquet(path, source, text_field, errors)
    else:
        yield from read_txt(path, source, errors, txt_mode)


def _unsupported(path):
    return ValueError(f"{path}: unsupported file type (want one of {', '.join(sorted(SUFFIXES))})")


# ------------------------------------------------------------------------------------------------------
# paths -> files

class EmptyInputError(ValueError):
    """No document to work on: the inputs name no file (an empty folder, an unmatched glob) or hold no document."""


def _dir_files(directory, errors, include_error):
    """Supported files under a directory. Where the directory is, is inside, or contains an extracted chinese-poetry
    package, that package gives only poetry_document_files() and the files it leaves out (author lists, 平仄 strains...)
    go to errors.skipped_files, named relative to `directory`."""
    def poetry(pkg, under):
        files, skipped = poetry_document_files(pkg, include_error=include_error)
        under = os.path.abspath(under) + os.sep
        for f, reason in skipped:
            if os.path.abspath(f).startswith(under):
                errors.skip_file(os.path.relpath(f, directory), reason)
        return [f for f in files if os.path.abspath(f).startswith(under)]

    pkg = find_poetry_package(directory)
    if pkg is not None:
        return poetry(pkg, directory)
    out = []
    for root, dirs, files in os.walk(directory):
        if root != directory and "package.json" in files and \
                find_poetry_package(root) == os.path.abspath(root):
            dirs[:] = []
            out += poetry(root, root)
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".") and format_of(f)]
    return sorted(out)


def expand_paths(paths, errors=None, poetry_include_error=False):
    """Resolve files / directories / globs to [(file, source)], source relative to the directory given (a glob's leading
    non-wildcard folder); a file named alone keeps its path. Directories are walked recursively (sorted, hidden entries
    skipped; chinese-poetry packages: _dir_files). FileNotFoundError for a missing path; an empty glob gives none."""
    errors = ReadErrors() if errors is None else errors
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = []
    for p in paths:
        p = os.fspath(p)
        if glob.has_magic(p):
            base = p
            while glob.has_magic(base):
                base = os.path.dirname(base)
            for m in sorted(glob.glob(p, recursive=True)):
                if os.path.isdir(m):
                    out += [(f, os.path.relpath(f, base or ".")) for f in _dir_files(m, errors,
                                                                                     poetry_include_error)]
                elif format_of(m):
                    out.append((m, os.path.relpath(m, base or ".")))
        elif os.path.isdir(p):
            out += [(f, os.path.relpath(f, p)) for f in _dir_files(p, errors, poetry_include_error)]
        elif os.path.isfile(p):
            out.append((p, os.path.normpath(p)))
        else:
            raise FileNotFoundError(f"input path not found: {p}")
    return out


def input_files(paths, errors=None, poetry_include_error=False):
    """expand_paths checked before anything is read or written: at least one (file, source), all of known types.
    FileNotFoundError for a missing path, ValueError naming an unsupported file, EmptyInputError for no file at all."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = expand_paths(paths, errors, poetry_include_error)
    for path, _ in files:
        if format_of(path) is None:
            raise _unsupported(path)
    if not files:
        raise EmptyInputError(f"no input file in {', '.join(map(os.fspath, paths))} "
                              f"(want {', '.join(sorted(SUFFIXES))} files, a folder of them or a glob)")
    return files


def read_files(files, text_field=None, errors=None, txt_mode="line"):
    """Documents of the (file, source) pairs of expand_paths / input_files, in order."""
    errors = ReadErrors() if errors is None else errors
    for path, source in files:
        yield from read_file(path, source, text_field or None, errors, txt_mode)


def iter_documents(paths, text_field=None, errors=None, txt_mode="line", poetry_include_error=False):
    """Stream documents from files, directories (recursive) and globs: {"text", "source": relative file path, "line":
    line/row number, ...metadata}. text_field: the field holding the text (None/"" = auto-detect). Skipped records and
    files go to `errors` (a ReadErrors). Memory is bounded by the largest record. Paths resolve when iteration starts:
    to catch a missing path before writing anything, call input_files first and read its list with read_files."""
    errors = ReadErrors() if errors is None else errors
    yield from read_files(expand_paths(paths, errors, poetry_include_error), text_field, errors, txt_mode)
