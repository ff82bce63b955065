"""Reading a corpus as a stream of documents, whatever it comes as.

A source is one file: plain text (``.txt``, ``.md``, ``.text``), JSON Lines or a JSON array
(``.jsonl``, ``.ndjson``, ``.json``), any of those compressed (``.gz``, ``.zst``, ``.xz``,
``.bz2``), Parquet (``.parquet``) or Arrow (``.arrow``, what ``datasets.save_to_disk`` writes).
A folder contributes every such file below it, in name order; a folder saved by Hugging Face
``datasets`` contributes its Arrow files in the order its ``state.json`` lists them (a
``DatasetDict`` folder: its ``train`` split).

Documents come out one at a time, so memory grows with the longest document, not with the corpus:
text is read in blocks, records line by line, Parquet and Arrow by record batch. The one exception
is a JSON array, which the standard library can only parse whole.

How text splits into documents (``split_documents`` is the definition; the streaming reader
gives the same documents): on lines holding only ``<|endoftext|>`` when the file has any;
otherwise a single text file splits on blank lines and, in a collection of files, each file is
one document. Records contribute their ``text_field``; null or empty ones are skipped and counted.
"""

from __future__ import annotations

import bz2
import gzip
import io
import itertools
import json
import lzma
import re
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from flopwise.errors import FlopwiseError, install_hint
from flopwise.fsutil import json_array, json_line

TEXT_KINDS = {".txt": "text", ".md": "text", ".text": "text", ".jsonl": "json", ".ndjson": "json",
              ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
COMPRESSIONS = {".gz", ".zst", ".zstd", ".xz", ".bz2"}
FORMATS_HINT = ("give text (.txt, .md), JSONL/JSON records, Parquet, Arrow or a datasets.save_to_disk folder, "
                "optionally compressed (.gz, .zst, .xz, .bz2)")
BLOCK_BYTES = 1 << 20
_EOT_TOKEN = "<|endoftext|>"
_EOT = re.compile(r"^\s*<\|endoftext\|>\s*$", re.MULTILINE)
_BLANK = re.compile(r"\n\s*\n")


@dataclass(frozen=True)
class Source:
    """One file of a corpus: its path, kind (text, json, parquet, arrow) and compression ('' for none)."""

    path: Path
    kind: str
    compression: str = ""

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def source_of(path: Path) -> Source:
    """How a file is read, from its name; a file of another name is read as plain text."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSIONS else ""
    kind = TEXT_KINDS.get(suffixes[-1], "text") if suffixes else "text"
    if compression and kind in ("parquet", "arrow"):
        raise FlopwiseError(f"{path}: a compressed {kind} file cannot be streamed: decompress it first "
                            f"({kind} files compress their columns themselves)")
    return Source(path, kind, compression)


def _known(path: Path) -> bool:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes.pop()
    return bool(suffixes) and suffixes[-1] in TEXT_KINDS


def _saved_dataset(folder: Path, log: Callable[[str], None]) -> list[Path] | None:
    """Arrow files of a folder written by ``datasets.save_to_disk``, in order; None when it is not one."""
    if (folder / "dataset_dict.json").is_file():
        try:
            splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        except (OSError, ValueError, KeyError, TypeError):
            splits = None
        if not isinstance(splits, list) or not splits:
            raise FlopwiseError(f"{folder}/dataset_dict.json cannot be read or lists no splits: save the dataset "
                                "again") from None
        if "train" not in splits:
            raise FlopwiseError(f"{folder} is a saved DatasetDict without a 'train' split (splits: "
                                f"{', '.join(map(str, splits))}): give the split's folder, e.g. "
                                f"{folder / str(splits[0])}")
        others = [s for s in splits if s != "train"]
        log(f"note: {folder} is a saved DatasetDict: reading its 'train' split"
            + (f" (for validation give --val {folder / others[0]})" if others else ""))
        files = _saved_dataset(folder / "train", log)
        if files is None:
            raise FlopwiseError(f"{folder / 'train'} is not a saved dataset (no state.json listing its data files): "
                                "save the dataset again")
        return files
    state = folder / "state.json"
    try:
        files = json.loads(state.read_text())["_data_files"] if state.is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # some other state.json: not a saved dataset
    if files is None:
        return None
    try:
        found = [folder / f["filename"] for f in files]
    except (KeyError, TypeError):
        raise FlopwiseError(f"{state} cannot be read as a saved dataset's state: save the dataset again") from None
    missing = [f for f in found if not f.is_file()]
    if missing or not found:
        raise FlopwiseError(f"{folder} is a saved dataset without its data files "
                            f"({missing[0] if missing else 'none'}): save the dataset again")
    return found


def _scan(folder: Path, log: Callable[[str], None]) -> list[Source]:
    """What a folder holds, in path order: the files flopwise reads, hidden ones skipped, and in the place
    of a saved dataset below it, that dataset's Arrow files (not its metadata or cache files)."""
    def hidden(p: Path) -> bool:
        return any(part.startswith(".") for part in p.relative_to(folder).parts)

    datasets: dict[Path, list[Path]] = {}
    for marker in sorted(folder.rglob("dataset_dict.json")) + sorted(folder.rglob("state.json")):
        d = marker.parent
        if hidden(marker) or any(d == k or k in d.parents for k in datasets):
            continue
        files = _saved_dataset(d, log)
        if files is not None:
            datasets[d] = files
    entries: list[tuple[Path, list[Source]]] = [(d, [Source(f, "arrow") for f in files])
                                                for d, files in datasets.items()]
    entries += [(f, [source_of(f)]) for f in folder.rglob("*")
                if f.is_file() and _known(f) and not hidden(f) and not any(k in f.parents for k in datasets)]
    return [src for _, group in sorted(entries, key=lambda e: e[0]) for src in group]


def expand(paths: list[Path], log: Callable[[str], None] = print) -> list[Source]:
    """The sources that paths name: files as they are, folders by what they hold (see the module doc)."""
    out = []
    for p in paths:
        if not p.exists():
            raise FlopwiseError(f"{p} does not exist: {FORMATS_HINT}")
        if not p.is_dir():
            out.append(source_of(p))
            continue
        saved = _saved_dataset(p, log)
        if saved is not None:
            out += [Source(f, "arrow") for f in saved]
            continue
        found = _scan(p, log)
        if not found:
            raise FlopwiseError(f"{p} holds no files flopwise reads: {FORMATS_HINT}")
        out += found
    return out


# ---------------------------------------------------------------- bytes


@contextmanager
def open_bytes(src: Source, counter: list[int] | None = None) -> Iterator[io.BufferedIOBase]:
    """The decompressed bytes of a source, closed with every layer below them on leaving the ``with``;
    ``counter[0]`` grows by the raw (on-disk) bytes read."""
    try:
        raw = open(src.path, "rb")
    except OSError as e:
        raise FlopwiseError(f"cannot read {src.path}: {e.strerror}") from None
    with ExitStack() as layers:
        layers.enter_context(raw)
        if counter is not None:
            raw = _Counting(raw, counter)
        if src.compression == ".gz":
            raw = layers.enter_context(gzip.GzipFile(fileobj=raw))
        elif src.compression == ".xz":
            raw = layers.enter_context(lzma.LZMAFile(raw))
        elif src.compression == ".bz2":
            raw = layers.enter_context(bz2.BZ2File(raw))
        elif src.compression in (".zst", ".zstd"):
            try:
                import zstandard
            except ImportError:
                raise FlopwiseError(f"{src.path}: reading .zst needs the zstandard package: "
                                    f"{install_hint('zstandard')}") from None
            raw = layers.enter_context(io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw)))
        yield raw


class _Counting(io.RawIOBase):
    """A raw file that adds what it reads to counter[0] (progress over the on-disk size)."""

    def __init__(self, fh, counter: list[int]):
        self.fh, self.counter = fh, counter

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.fh.readinto(b)
        self.counter[0] += n or 0
        return n

    def close(self) -> None:
        self.fh.close()
        super().close()


def _blocks(src: Source, counter: list[int] | None = None) -> Iterator[bytes]:
    """The decompressed bytes in blocks of about BLOCK_BYTES, each ending at a line end (so no
    character and no line is cut); the first block is checked for binary data."""
    try:
        with open_bytes(src, counter) as fh:
            first = True
            while True:
                block = fh.read(BLOCK_BYTES)
                if not block:
                    return
                if not block.endswith(b"\n"):
                    block += fh.readline()
                if first:
                    check_text(block, src.path)
                    first = False
                yield block
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as e:
        raise FlopwiseError(f"{src.path} is damaged or not {src.compression or 'text'} ({e}): check the file") from None
    except Exception as e:  # zstandard.ZstdError: its module may not be imported here
        if type(e).__name__ != "ZstdError":
            raise
        raise FlopwiseError(f"{src.path} is damaged or not {src.compression} ({e}): check the file") from None


def check_text(head: bytes, path: Path) -> None:
    """Refuse binary data (an image, an archive, a model file): NUL bytes, or mostly bytes that are not UTF-8."""
    head = head[: 1 << 20]
    bad = head.decode("utf-8", errors="replace").count("\ufffd") - head.count("\ufffd".encode())
    if b"\0" in head or bad > 0.1 * max(1, len(head)):
        raise FlopwiseError(f"{path} is not text (binary data): {FORMATS_HINT}")


def decode(raw: bytes, stats: dict, path: Path) -> str:
    """UTF-8 with invalid sequences replaced by U+FFFD, counted in stats."""
    text = raw.decode("utf-8", errors="replace")
    if "\ufffd" in text:
        bad = text.count("\ufffd") - raw.count("\ufffd".encode())
        if bad:
            stats["replaced"] = stats.get("replaced", 0) + bad
            files = stats.setdefault("files_with_bad_bytes", [])
            if not files or files[-1] != str(path):
                files.append(str(path))
    return text


# ---------------------------------------------------------------- text


def split_documents(text: str, on_blank_lines: bool = True) -> list[str]:
    """Documents of a text: split on <|endoftext|> lines when present, else on blank lines
    (or not at all when ``on_blank_lines`` is false: the whole text is one document)."""
    if _EOT.search(text):
        parts = _EOT.split(text)
    else:
        parts = _BLANK.split(text) if on_blank_lines else [text]
    return [p.strip("\n") for p in parts if p.strip()]


def _has_eot(src: Source, seen: dict) -> bool:
    if src.path not in seen:
        seen[src.path] = any(b"<|endoftext|>" in b and _EOT.search(b.decode("utf-8", errors="replace"))
                             for b in _blocks(src))
    return seen[src.path]


def _separators(text: str, sep: re.Pattern) -> list[tuple[int, int]]:
    """Where ``sep`` matches in ``text``, as finditer finds them. For <|endoftext|> lines the regex is tried only
    where a match can start, found from each occurrence of the token with str.find: at the first line start in the
    whitespace before it (the regex tried at every character was most of a pass's time). The same matches: one
    that starts earlier cannot reach the token, and from a later line start the match would end the same way."""
    if sep is not _EOT:
        return [m.span() for m in sep.finditer(text)]
    spans, pos = [], 0
    while (token := text.find(_EOT_TOKEN, pos)) >= 0:
        start = token
        while start > pos and text[start - 1].isspace():  # str.isspace is what \s matches
            start -= 1
        newline = text.find("\n", start - 1, token) if start else -1
        line = 0 if start == 0 else newline + 1 if newline >= 0 else None  # the first line start from start on
        m = None if line is None else sep.match(text, line)  # ('^' still means a line start: pos is not one)
        if m is not None:
            spans.append(m.span())
            pos = m.end()
        else:  # the token is not alone on its line
            pos = token + 1
    return spans


def _pieces(text: str, spans: list[tuple[int, int]], end: int = 0) -> Iterator[str]:
    """The documents between separators (from ``end``, up to the last span's start), blank ones dropped."""
    for start, stop in spans:
        p = text[end:start]
        if p.strip():
            yield p.strip("\n")
        end = stop


def _split_stream(texts: Iterator[str], sep: re.Pattern) -> Iterator[str]:
    """split_documents over a text that arrives in pieces cut at line ends: what follows the last
    separator (the separator included, as more of it may follow) waits for the next piece. Text held
    without a separator is searched again only once it has doubled (a long document costs linear time:
    searching later is the same as cutting the pieces coarser, which the split does not depend on)."""
    held: list[str] = []
    held_chars = searched = 0
    for piece in texts:
        held.append(piece)
        held_chars += len(piece)
        if held_chars < 2 * searched:
            continue
        text = "".join(held)
        spans = _separators(text, sep)
        if spans:
            last = spans[-1][0]
            yield from _pieces(text, [*spans[:-1], (last, last)])
            text = text[last:]
        held, held_chars, searched = [text], len(text), len(text)
    text = "".join(held)
    yield from _pieces(text, [*_separators(text, sep), (len(text), len(text))])


def _text_documents(src: Source, whole_file: bool, stats: dict, counter, eot_seen: dict) -> Iterator[str]:
    texts = (decode(b, stats, src.path) for b in _blocks(src, counter))
    if _has_eot(src, eot_seen):
        yield from _split_stream(texts, _EOT)
    elif whole_file:
        text = "".join(texts).strip("\n")
        if text.strip():
            yield text
    else:
        yield from _split_stream(texts, _BLANK)


# ---------------------------------------------------------------- records


def _field(record, field: str, where: str, src: Source, stats: dict) -> str | None:
    if not isinstance(record, dict):
        raise FlopwiseError(f"{src.path}: {where} is not an object with a '{field}' field")
    if field not in record:
        keys = ", ".join(list(map(str, record))[:8]) or "none"
        raise FlopwiseError(f"{src.path}: {where} has no '{field}' field (its fields: {keys}): give --text-field")
    value = record[field]
    if value is None:
        stats["null_records"] = stats.get("null_records", 0) + 1
        return None
    if not isinstance(value, str):
        raise FlopwiseError(f"{src.path}: {where} field '{field}' is {type(value).__name__}, not text")
    return value


def _json_documents(src: Source, field: str, stats: dict, counter) -> Iterator[str]:
    blocks = _blocks(src, counter)
    first = next(blocks, b"")
    if first.lstrip().startswith(b"["):  # a JSON array: parsed whole (the standard library has no streaming parser)
        records = json_array(decode(first + b"".join(blocks), stats, src.path), str(src.path))
        for i, r in enumerate(records):
            value = _field(r, field, f"record {i}", src, stats)
            if value and value.strip():
                yield value
        return
    n_record, n_line = 0, 0
    for block in itertools.chain([first] if first else [], blocks):
        for line in decode(block, stats, src.path).split("\n"):
            n_line += 1
            if not line.strip():
                continue
            record = json_line(line, n_line, str(src.path))
            value = _field(record, field, f"record {n_record} (line {n_line})", src, stats)
            n_record += 1
            if value and value.strip():
                yield value
        n_line -= 1  # the block ended with a line end: its last, empty piece was not a line


# ---------------------------------------------------------------- columnar


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise FlopwiseError(f"reading Parquet or Arrow needs pyarrow: {install_hint('pyarrow')}") from None
    return pyarrow


def _columnar_documents(src: Source, field: str, stats: dict, counter) -> Iterator[str]:
    with ExitStack() as files:
        yield from _columnar_open(src, field, stats, counter, files)


def _columnar_open(src: Source, field: str, stats: dict, counter, files: ExitStack) -> Iterator[str]:
    pa = _pyarrow()
    try:
        if src.kind == "parquet":
            reader = pa.parquet.ParquetFile(src.path)
            files.callback(reader.close)
            schema, total_rows = reader.schema_arrow, reader.metadata.num_rows
            batches = reader.iter_batches(batch_size=4096, columns=[field] if field in schema.names else None)
        else:
            source = files.enter_context(pa.memory_map(str(src.path)))
            try:
                reader = pa.ipc.open_stream(source)
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(source)
                reader = iter(reader.get_batch(i) for i in range(reader.num_record_batches))
            schema, total_rows = reader.schema if hasattr(reader, "schema") else None, None
            batches = reader
    except (OSError, pa.ArrowException) as e:
        raise FlopwiseError(f"{src.path} cannot be read as {src.kind} ({str(e).splitlines()[0]}): check the "
                            "file") from None
    size, row = src.size, 0
    try:
        for batch in batches:
            if schema is None:
                schema = batch.schema
            if field not in schema.names:
                raise FlopwiseError(f"{src.path} has no column '{field}' (its columns: "
                                    f"{', '.join(schema.names[:8])}): give --text-field")
            column = batch.column(schema.names.index(field) if batch.num_columns > 1 else 0)
            if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                raise FlopwiseError(f"{src.path}: column '{field}' holds {column.type}, not text: give --text-field")
            for value in column.to_pylist():
                row += 1
                if value is None:
                    stats["null_records"] = stats.get("null_records", 0) + 1
                elif value.strip():
                    yield value
            if counter is not None and total_rows:
                counter[0] += int(size * batch.num_rows / total_rows)
    except (OSError, pa.ArrowException) as e:
        raise FlopwiseError(f"{src.path}: row {row} cannot be read ({str(e).splitlines()[0]}): check the "
                            "file") from None
    if counter is not None and not total_rows:
        counter[0] += size


# ---------------------------------------------------------------- all of it


def documents(src: Source, text_field: str = "text", whole_file: bool = False, stats: dict | None = None,
              counter: list[int] | None = None, eot_seen: dict | None = None) -> Iterator[str]:
    """The documents of one source, streamed (see the module doc). ``stats`` collects replaced bytes and
    null records; ``counter[0]`` grows by the on-disk bytes read; ``eot_seen`` caches the per-file
    marker scan between passes."""
    stats = {} if stats is None else stats
    eot_seen = {} if eot_seen is None else eot_seen
    if src.kind == "text":
        return _text_documents(src, whole_file, stats, counter, eot_seen)
    if src.kind == "json":
        return _json_documents(src, text_field, stats, counter)
    return _columnar_documents(src, text_field, stats, counter)
