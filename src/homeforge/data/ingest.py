"""Ingest: find input files and stream raw records out of them.

Formats: .txt/.md (one document per file), .html/.htm (text extracted with the standard
library parser), .jsonl/.json, .csv/.tsv, .parquet (pyarrow, batch by batch), .pdf
(pypdf), .docx (python-docx). Structured inputs pick fields from ``config.InputFields``.

A bad line or file never stops the run: it goes to ``Issues`` (reason, file, line) and is
counted in the report; with ``strict`` it raises a ``HomeforgeError`` naming file and line.
Problems the user must fix before anything makes sense (a field that does not exist in a
CSV/parquet header, no input files) raise at once.
"""

from __future__ import annotations

import codecs
import csv
import glob
import json
import os
from collections import Counter
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

from homeforge.data.columns import ColumnStats
from homeforge.errors import HomeforgeError

TEXT_EXT = {".txt", ".md", ".markdown", ".rst", ".text"}
HTML_EXT = {".html", ".htm", ".xhtml"}
FORMATS = TEXT_EXT | HTML_EXT | {".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".pdf", ".docx"}
BUILTIN_PREFIX = "builtin:"
BUILTINS = {"stdlib-docstrings"}


# --------------------------------------------------------------------------- issues


class Issues:
    """Bad lines and files: counted by reason, the first ``max_named`` named individually."""

    def __init__(self, strict: bool = False, max_named: int = 200, sink=None):
        self.strict = strict
        self.max_named = max_named
        self.sink = sink  # called with every issue (prepare writes them to drops.jsonl)
        self.files: Counter = Counter()  # whole files skipped, by reason (line is None)
        self.lines: Counter = Counter()  # single records dropped, by reason
        self.named: list[dict] = []

    def add(self, reason: str, file: str, line: int | None = None, detail: str = "") -> None:
        if self.strict:
            where = f"{file}:{line}" if line is not None else file
            raise HomeforgeError(f"{reason.replace('_', ' ')}: {detail}".rstrip(": "), where=where,
                                 fix="fix or remove this input, or run without --strict to skip and count it")
        (self.files if line is None else self.lines)[reason] += 1
        if self.sink is not None:
            self.sink(reason, file, line, detail)
        if len(self.named) < self.max_named:
            self.named.append({"reason": reason, "file": file, "line": line, "detail": detail})


# --------------------------------------------------------------------------- discovery


def discover(inputs: list[str]) -> tuple[list[Path], list[str], dict[Path, str]]:
    """(files, builtins, names): inputs expanded (folders recursively, globs), sorted, hidden skipped.

    ``names`` are the names used in records and reports: relative to the folder given
    (``docs/a/b.txt`` for input ``/x/docs``), so the dataset does not depend on the cwd.
    """
    if not inputs:
        raise HomeforgeError("no inputs given", fix="pass files, folders or globs, e.g. `homeforge prepare docs/ -o data`")
    files: list[Path] = []
    builtins: list[str] = []
    names: dict[Path, str] = {}
    for item in inputs:
        if item.startswith(BUILTIN_PREFIX):
            name = item[len(BUILTIN_PREFIX):]
            if name not in BUILTINS:
                raise HomeforgeError(f"unknown builtin corpus {name!r}", fix=f"choose one of: {', '.join(sorted(BUILTINS))}")
            builtins.append(name)
            continue
        p = Path(item).expanduser()
        if p.is_dir():
            if not os.access(p, os.R_OK | os.X_OK):
                raise HomeforgeError(f"cannot read folder {p}: permission denied", where=str(p),
                                     fix="fix its permissions (chmod +rx) or run as a user who may read it")
            found = sorted(q for q in p.rglob("*") if q.is_file()
                           and not any(part.startswith(".") for part in q.relative_to(p).parts))
            files += found
            for q in found:
                names.setdefault(q, (Path(p.resolve().name) / q.relative_to(p)).as_posix())
        elif p.is_file():
            files.append(p)
            names.setdefault(p, p.name)
        elif any(c in item for c in "*?["):
            found = sorted(Path(q) for q in glob.glob(os.path.expanduser(item), recursive=True) if Path(q).is_file())
            files += found
            for q in found:
                names.setdefault(q, q.as_posix())
        else:
            raise HomeforgeError(f"input {item} does not exist", fix="check the path (folders, files and globs are accepted)")
    seen: set[Path] = set()
    unique = []
    for f in files:
        r = f.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(f)
    if not unique and not builtins:
        raise HomeforgeError(f"no input files found in {', '.join(inputs)}", where=", ".join(inputs),
                             fix=f"the folder is empty; supported formats: {', '.join(sorted(FORMATS))}")
    return unique, builtins, names


# --------------------------------------------------------------------------- decoding


class _Undecodable(Exception):
    pass


def decode(data: bytes, encodings: list[str]) -> str:
    """Decode text bytes: honour a BOM, refuse binary, else try ``encodings`` in order."""
    for bom, enc in ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                     (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):
            try:
                return data.decode(enc)
            except UnicodeDecodeError as exc:
                raise _Undecodable(f"has a {enc} byte-order mark but does not decode ({exc.reason})") from None
    head = data[:8192]
    if b"\x00" in head:
        raise _Undecodable("binary data (NUL bytes), not text")
    for enc in encodings:
        try:
            return data.decode(enc)
        except (UnicodeDecodeError, LookupError):
            continue
    raise _Undecodable(f"not valid {' / '.join(encodings)}; add its encoding to `encodings` (e.g. encodings=[utf-8,gb18030])")


class _HTMLText(HTMLParser):
    _SKIP = {"script", "style", "noscript", "template", "svg", "head"}
    _BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "pre",
              "blockquote", "table", "ul", "ol", "hr", "title", "header", "footer", "td", "th"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in self._SKIP:
            self.skip += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self._SKIP and self.skip:
            self.skip -= 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def html_to_text(source: str) -> str:
    p = _HTMLText()
    p.feed(source)
    p.close()
    return "".join(p.parts)


# --------------------------------------------------------------------------- readers


def _read_bytes(path: Path, name: str, issues: Issues) -> bytes | None:
    try:
        return path.read_bytes()
    except PermissionError:
        issues.add("unreadable_file", name, None, "permission denied; fix its permissions or remove it")
    except OSError as exc:
        issues.add("unreadable_file", name, None, exc.strerror or str(exc))
    return None


def _check_fields(columns: list[str], wanted: list[str], name: str) -> None:
    missing = [w for w in wanted if w not in columns]
    if missing:
        raise HomeforgeError(
            f"{name} has no column {', '.join(repr(m) for m in missing)}",
            where=name,
            fix=f"its columns are: {', '.join(columns) or '(none)'}; set fields.text / fields.label / fields.messages to one of them",
        )


class _BinaryLines:
    """Lines of a file as bytes (decoded one by one by ``Reader._lines``)."""

    def __init__(self, path: Path, encoding: str):
        self.f = open(path, "rb")
        self.encoding = encoding

    def __iter__(self):
        return iter(self.f)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.f.close()


class Reader:
    """Streams raw records ``{"text"|"messages"|..., "label"?, "_src": "file:line"}`` from inputs."""

    def __init__(self, cfg, issues: Issues, root_of: dict[Path, Path] | None = None):
        self.cfg = cfg
        self.kind = cfg.kind
        self.f = cfg.fields
        self.issues = issues
        self.tables: dict[str, ColumnStats] = {}
        self.formats: Counter = Counter()

    def _wanted_columns(self) -> list[str]:
        if self.kind == "chat":
            return []  # chat shapes are detected per record
        return [self.f.text] + ([self.f.label] if self.kind == "classification" else [])

    def from_row(self, row, name: str, line: int) -> dict | None:
        """Pick fields from one structured row; None (and an issue) when it does not fit."""
        if not isinstance(row, dict):
            self.issues.add("malformed_record", name, line, "a record is not an object")
            return None
        rec: dict = {"_src": f"{name}:{line}"}
        if self.f.id and row.get(self.f.id) is not None:
            rec["id"] = str(row[self.f.id])
        if self.kind == "chat":
            from homeforge.data.chat import to_messages

            msgs, problem = to_messages(row, self.f.messages)
            if msgs is None:
                self.issues.add("bad_chat_record", name, line, problem or "")
                return None
            rec["messages"] = msgs
            return rec
        text = row.get(self.f.text)
        if text is None or (isinstance(text, float) and text != text):
            self.issues.add("missing_field", name, line, f"no {self.f.text!r} value")
            return None
        rec["text"] = text if isinstance(text, str) else str(text)
        if self.kind == "classification":
            label = row.get(self.f.label)
            if label is None or (isinstance(label, str) and not label.strip()) or (isinstance(label, float) and label != label):
                if self.f.missing_label == "error":
                    raise HomeforgeError(
                        f"the record at {name}:{line} has no {self.f.label!r} value (kind classification needs a "
                        "label in every record)", where=f"{name}:{line}",
                        fix="add the label, point fields.label to the right field, or set fields.missing_label=drop "
                            "to drop such records (each listed in drops.jsonl)")
                self.issues.add("missing_label", name, line, f"no {self.f.label!r} value")
                return None
            rec["label"] = str(label)
        return rec

    def read(self, path: Path, name: str) -> Iterator[dict]:
        ext = path.suffix.lower()
        if ext not in FORMATS:
            self.issues.add("unsupported_format", name, None, f"{ext or 'no extension'} is not one of {', '.join(sorted(FORMATS))}")
            return
        self.formats[ext] += 1
        if ext == ".parquet":
            yield from self._parquet(path, name)
        elif ext == ".pdf":
            yield from self._document(path, name, self._pdf_text)
        elif ext == ".docx":
            yield from self._document(path, name, self._docx_text)
        else:
            if ext in (".jsonl", ".ndjson", ".csv", ".tsv"):  # streamed line by line
                stream = self._open_text(path, name)
                if stream is None:
                    return
                with stream:
                    if ext in (".csv", ".tsv"):
                        yield from self._csv(stream, name, "\t" if ext == ".tsv" else ",")
                    else:
                        yield from self._jsonl(stream, name)
                return
            data = _read_bytes(path, name, self.issues)
            if data is None:
                return
            try:
                text = decode(data, self.cfg.encodings)
            except _Undecodable as exc:
                reason = "binary_file" if "binary" in str(exc) else "unknown_encoding"
                self.issues.add(reason, name, None, str(exc))
                return
            if ext == ".json":
                yield from self._json(text, name)
            else:
                if ext in HTML_EXT:
                    text = html_to_text(text)
                yield from self._plain(text, name, path)

    # plain documents --------------------------------------------------------

    def _plain(self, text: str, name: str, path: Path) -> Iterator[dict]:
        if self.kind == "chat":
            self.issues.add("bad_chat_record", name, None, "a plain text file is not a conversation; use .jsonl with messages")
            return
        rec = {"text": text, "_src": name}
        if self.kind == "classification":
            rec["label"] = path.parent.name  # folder-per-class layout: data/<label>/<file>.txt
        yield rec

    def _document(self, path: Path, name: str, extract) -> Iterator[dict]:
        try:
            text = extract(path)
        except PermissionError:
            self.issues.add("unreadable_file", name, None, "permission denied; fix its permissions or remove it")
            return
        except Exception as exc:  # pypdf / python-docx raise many kinds on broken files
            self.issues.add("unreadable_file", name, None, f"cannot be parsed ({type(exc).__name__}: {str(exc)[:120]})")
            return
        yield from self._plain(text, name, path)

    @staticmethod
    def _pdf_text(path: Path) -> str:
        import logging

        from pypdf import PdfReader

        logging.getLogger("pypdf").setLevel(logging.ERROR)
        reader = PdfReader(str(path), strict=False)
        return "\n\n".join((page.extract_text() or "") for page in reader.pages)

    @staticmethod
    def _docx_text(path: Path) -> str:
        import docx

        d = docx.Document(str(path))
        parts = [p.text for p in d.paragraphs]
        for table in d.tables:
            for row in table.rows:
                parts.append("\t".join(c.text for c in row.cells))
        return "\n".join(parts)

    # structured -------------------------------------------------------------

    def _open_text(self, path: Path, name: str):
        """A text stream in the encoding sniffed from the file's head (BOM, then ``encodings``)."""
        try:
            f = open(path, "rb")
        except OSError as exc:
            detail = "permission denied; fix its permissions or remove it" if isinstance(exc, PermissionError) else (exc.strerror or str(exc))
            self.issues.add("unreadable_file", name, None, detail)
            return None
        with f:
            head = f.read(1 << 16)
            more = bool(f.read(1))
        if more and b"\n" in head:
            head = head[: head.rfind(b"\n") + 1]  # do not cut a multi-byte character
        enc = None
        for bom, e in ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                       (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
            if head.startswith(bom):
                enc = e
                break
        if enc is None and b"\x00" in head[:8192]:
            self.issues.add("binary_file", name, None, "binary data (NUL bytes), not text")
            return None
        if enc is None:
            for e in self.cfg.encodings:
                try:
                    head.decode(e)
                except (UnicodeDecodeError, LookupError):
                    continue
                enc = e
                break
        if enc is None:
            self.issues.add("unknown_encoding", name, None, f"not valid {' / '.join(self.cfg.encodings)}; add its encoding "
                            "to `encodings` (e.g. encodings=[utf-8,gb18030])")
            return None
        if enc in ("utf-16", "utf-32"):  # newline bytes are not separable: decode as a text stream
            return open(path, encoding=enc, newline="")
        return _BinaryLines(path, "utf-8" if enc == "utf-8-sig" else enc)

    def _lines(self, stream, name: str) -> Iterator[tuple[int, str]]:
        """(line number, text); a line that does not decode is counted and skipped, the file goes on."""
        i = 0
        it = iter(stream)
        while True:
            try:
                line = next(it)
            except StopIteration:
                return
            except UnicodeDecodeError as exc:
                self.issues.add("unknown_encoding", name, i + 1, f"{exc.reason}; the rest of the file was skipped")
                return
            i += 1
            if isinstance(line, bytes):
                try:
                    line = line.decode(stream.encoding)
                except UnicodeDecodeError as exc:
                    self.issues.add("unknown_encoding", name, i, f"{exc.reason} (line skipped)")
                    continue
                if i == 1 and line.startswith("\ufeff"):
                    line = line[1:]
            yield i, line

    def _jsonl(self, stream, name: str) -> Iterator[dict]:
        for i, line in self._lines(stream, name):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                self.issues.add("malformed_json", name, i, exc.msg)
                continue
            rec = self.from_row(row, name, i)
            if rec is not None:
                yield rec

    def _json(self, text: str, name: str) -> Iterator[dict]:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            self.issues.add("malformed_json", name, None, f"line {exc.lineno}: {exc.msg}; the whole file was skipped")
            return
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else [data]
        if not isinstance(data, list):
            self.issues.add("malformed_record", name, None, "top level is neither a list nor an object")
            return
        for i, row in enumerate(data, 1):
            rec = self.from_row(row, name, i)
            if rec is not None:
                yield rec

    def _csv(self, stream, name: str, delimiter: str) -> Iterator[dict]:
        csv.field_size_limit(1 << 30)
        reader = csv.DictReader((line for _, line in self._lines(stream, name)), delimiter=delimiter)
        columns = reader.fieldnames or []
        _check_fields(columns, self._wanted_columns(), name)
        stats = self.tables[name] = ColumnStats(columns)
        batch: list[dict] = []
        for i, row in enumerate(reader, 2):
            if None in row:  # more cells than header columns
                self.issues.add("malformed_row", name, i, f"{len(columns) + len(row[None])} cells, header has {len(columns)}")
                continue
            batch.append(row)
            if len(batch) >= 1024:
                stats.add_dict_rows(batch)
                batch = []
            rec = self.from_row(row, name, i)
            if rec is not None:
                yield rec
        stats.add_dict_rows(batch)

    def _parquet(self, path: Path, name: str) -> Iterator[dict]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(str(path))
        except PermissionError:
            self.issues.add("unreadable_file", name, None, "permission denied; fix its permissions or remove it")
            return
        except (pa.ArrowException, OSError) as exc:
            self.issues.add("unreadable_file", name, None, f"not a readable parquet file ({str(exc)[:120]})")
            return
        columns = pf.schema_arrow.names
        _check_fields(columns, self._wanted_columns(), name)
        numeric = [c for c in columns if pa.types.is_integer(pf.schema_arrow.field(c).type)
                   or pa.types.is_floating(pf.schema_arrow.field(c).type)]
        stats = self.tables[name] = ColumnStats(numeric)
        line = 0
        for batch in pf.iter_batches(batch_size=2048):
            if stats.columns:
                vals = np.stack([batch.column(c).to_numpy(zero_copy_only=False).astype(float) for c in stats.columns], 1)
                stats.update_rows(vals, np.ones(len(stats.columns), dtype=bool))
            for row in batch.to_pylist():
                line += 1
                rec = self.from_row(row, name, line)
                if rec is not None:
                    yield rec

    # builtin ----------------------------------------------------------------

    def builtin(self, name: str) -> Iterator[dict]:
        if name == "stdlib-docstrings":
            from homeforge.data.corpus import stdlib_docstrings

            for i, doc in enumerate(stdlib_docstrings(self.cfg.max_builtin_chars, min_chars=1), 1):
                yield {"text": doc, "_src": f"builtin:stdlib-docstrings:{i}"}
