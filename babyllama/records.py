"""Raw records from .jsonl / .json / .parquet / .csv files, and the one convention for what is skipped (ReadErrors).

    errors = ReadErrors()
    for line, record in iter_records("data/sft/alpaca.json", errors):
        ...                                  # record: the parsed JSON value or the parquet row as a dict
    print(errors.report())

Nothing is dropped silently: a malformed line... is skipped, counted and named ("file:line: reason"); only an unreadable
file raises. SFT and preference loaders read files this way; readers.py makes records documents. Torch-free."""
import csv
import gzip
import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv",
            ".txt": "txt"}
RECORD_FORMATS = ("jsonl", "json", "parquet", "csv")
_JSON_CHUNK = 1 << 20  # characters per .json read (tests shrink it to hit every buffer boundary)


# ------------------------------------------------------------------------------------------------------
# error collection

class ReadErrors:
    """Counts and names everything the readers skipped: `count` / `by_reason` / `examples` are skipped records;
    `skipped_files` whole files left out on purpose (reason -> paths); `files_read` the files read."""

    def __init__(self, max_examples=20):
        self.max_examples = max_examples
        self.count = 0
        self.by_reason = {}
        self.examples = []  # "path:line: reason (detail)"
        self.skipped_files = {}
        self.files_read = 0

    def add(self, source, line, reason, detail=""):
        """Record one skipped record: `reason` a short category (keys by_reason), `detail` the specifics, `line` its
        line (or row) number, None if unknown."""
        self.count += 1
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        if len(self.examples) < self.max_examples:
            where = f"{source}:{line}" if line is not None else str(source)
            self.examples.append(f"{where}: {reason}" + (f" ({detail})" if detail else ""))

    def skip_file(self, path, reason):
        """Record a whole file left out on purpose, under skipped_files[reason]."""
        self.skipped_files.setdefault(reason, []).append(str(path))

    @property
    def skipped_file_count(self):
        """Number of files recorded by skip_file, over all reasons."""
        return sum(len(v) for v in self.skipped_files.values())

    def to_dict(self, max_paths=10):
        """A JSON-serialisable summary: files_read, malformed_records, malformed_by_reason (most frequent first),
        malformed_examples, and skipped_files as reason -> {count, examples: the first max_paths paths}."""
        return {
            "files_read": self.files_read,
            "malformed_records": self.count,
            "malformed_by_reason": dict(sorted(self.by_reason.items(), key=lambda kv: -kv[1])),
            "malformed_examples": list(self.examples),
            "skipped_files": {r: {"count": len(p), "examples": p[:max_paths]}
                              for r, p in self.skipped_files.items()},
        }

    def brief(self):
        """One line for errors: files read, records skipped and the first of them, files skipped on purpose."""
        out = f"{self.files_read} files read, {self.count} malformed records skipped" + \
            (f" (e.g. {self.examples[0]})" if self.examples else "")
        return out + (f", {self.skipped_file_count} files skipped on purpose" if self.skipped_files else "")

    def report(self):
        """Multi-line summary (no trailing newline): files read and skipped on purpose, skipped records per reason, the
        kept examples and how many more there were."""
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
# raw records: one reader for every JSON-like file

def iter_records(path, errors, source=None):
    """Iterator of (line, record) over one .jsonl / .ndjson, .json or .parquet file (.gz read through gzip, parquet
    aside). line: where the record starts (from 1), the row number for parquet; record: the parsed JSON value, or the
    parquet row as a dict (None where null). .json: a top-level array, one value, or concatenated values, parsed one
    element at a time (_JsonStream), so a big array never sits in memory whole.

    Skipped records go to errors (a ReadErrors) as source:line with a reason: in .jsonl a line not JSON ("bad json") or
    not UTF-8 ("invalid utf-8") is skipped; in .json either stops the file there (JSON cannot be resynchronised), the
    records before it kept. source names the file in errors (default: path). Raises, when called, not iterated:
    FileNotFoundError, IsADirectoryError for a folder, ValueError for another file type or a non-regular file."""
    source = str(path) if source is None else source
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: a folder, not a file (give the files in it)")
    if not os.path.isfile(path):  # a pipe or a device: reading it could block for ever
        raise ValueError(f"{path}: not a regular file")
    fmt = format_of(path)
    if fmt not in RECORD_FORMATS:
        raise ValueError(f"{path}: unsupported file type for records (want .jsonl, .ndjson, .json, .parquet or .csv)")
    errors.files_read += 1
    by_format = {"jsonl": _jsonl_records, "json": _json_records, "parquet": _parquet_records, "csv": _csv_records}
    return by_format[fmt](path, source, errors)


def _jsonl_records(path, source, errors):
    with open_binary(path) as f:  # binary: a bad line is decoded (and skipped) alone
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            line = decode_line(raw, source, lineno, errors)
            if line is None:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                errors.add(source, lineno, "bad json", f"{e.msg} at column {e.colno}")
                continue
            yield lineno, rec


def _csv_records(path, source, errors):
    """A .csv file with a header row: each row a record {header field: value} (quoted fields may hold newlines; line:
    where the row starts). A row with another number of fields than the header is skipped ("bad csv row"). A line
    that is not UTF-8 (decode_line names it), a quote left open or a header naming a field twice stops the file
    there, the whole rows before it kept."""
    def lines(f):  # decoded one line at a time, so a bad byte is named by its line
        for lineno, raw in enumerate(f, 1):
            text = decode_line(raw, source, lineno, errors)
            if text is None:
                return
            yield text

    with open_binary(path) as f:
        reader = csv.reader(lines(f), strict=True)  # strict: an open quote at the end is an error, not a row
        line = 1
        try:
            header = next(reader, None)
            if header and len(set(header)) < len(header):
                errors.add(source, 1, "bad csv header", f"a field named twice: {', '.join(header)}")
                return
            line = reader.line_num + 1
            for row in reader:
                if row and len(row) != len(header):
                    errors.add(source, line, "bad csv row", f"{len(row)} fields, the header has {len(header)}")
                elif row:
                    yield line, dict(zip(header, row))
                line = reader.line_num + 1
        except csv.Error as e:
            errors.add(source, line, "bad csv", f"{e} (a quote left open?); rest of file not read")


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
    """Number of the first line that is not UTF-8, else None (a newline byte is never inside a UTF-8 character)."""
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return lineno
    return None


def parquet_file(path):
    """pyarrow's ParquetFile of path; ValueError naming a file pyarrow cannot open. pre_buffer=False: by default
    iter_batches reads ahead every column chunk, memory O(file) instead of O(batch)."""
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


def format_of(path):
    """'jsonl' / 'json' / 'parquet' / 'txt' from the file name (a trailing .gz ignored), else None."""
    name = str(path).lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return SUFFIXES.get(os.path.splitext(name)[1])


def open_binary(path):
    """The file as binary, through gzip when its name ends in .gz."""
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def decode_line(raw, source, lineno, errors):
    """One line's bytes as text (a BOM on line 1 dropped); None, reported as "invalid utf-8", when not UTF-8."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        errors.add(source, lineno, "invalid utf-8", f"byte {e.start} of the line")
        return None
    if lineno == 1 and text.startswith("\ufeff"):
        text = text[1:]
    return text


# ------------------------------------------------------------------------------------------------------
# .json: an incremental parser, one top-level array element at a time

class _JsonStreamError(Exception):
    def __init__(self, line, msg):
        super().__init__(msg)
        self.line, self.msg = line, msg


_WS = re.compile(r"[ \t\r\n]*")


class _JsonStream:
    """Incremental JSON reader: a top-level array one element at a time, anything else as a sequence of top-level
    values. Holds the current element plus one chunk; tracks line numbers for error messages."""

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


def nothing_usable(path, what, errors, skipped):
    """The ValueError for a file that gave no usable `what`, naming the file, how many records were skipped and why
    (skipped: reason -> count), and the first of them errors still holds."""
    total = sum(skipped.values())
    if not total:
        return ValueError(f"{path}: no {what} in it (the file holds no records)")
    examples = [e for e in errors.examples if e.startswith(f"{path}:")][:3]
    reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items(), key=lambda kv: -kv[1]))
    return ValueError(f"{path}: no usable {what}: {total} records skipped" +
                      (", e.g. " + "; ".join(examples) if examples else "") + f"; skipped by reason: {reasons}")
