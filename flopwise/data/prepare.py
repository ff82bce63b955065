"""Corpus preparation: text -> SentencePiece BPE tokenizer -> train/validation token files.

A prepared corpus is a folder::

    tokenizer.model    SentencePiece BPE, byte fallback, Llama-2 ids (unk 0, bos 1, eos 2)
    tokens-train.bin   uint16 (vocab <= 65536) or uint32 memmap: [bos] doc [eos] [bos] doc [eos] ...
    tokens-val.bin
    meta.json          sizes, dtype, UTF-8 bytes of each split (for bits per byte), sources, content hash

It is keyed by a hash of the input bytes and the options, so preparing the same data twice is
instant. Documents are split on lines holding ``<|endoftext|>`` when a file has them; otherwise
a single text file is split on blank lines and each file of a collection is one document.
JSONL files contribute their records' ``text`` fields.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from flopwise.data.tokenizer import BOS_ID, EOS_ID, UNK_ID, load_tokenizer, train_tokenizer
from flopwise.errors import FlopwiseError
from flopwise.fsutil import cache_root, check_output_dir, parse_records, usual_mode

DEFAULT_VOCAB_SIZE = 4096
PREPARE_VERSION = 1  # bump when the output of prepare() changes for the same input
MIN_TRAIN_TOKENS = 2048
TEXT_SUFFIXES = {".txt", ".md", ".text", ".jsonl", ".json"}
_EOT = re.compile(r"^\s*<\|endoftext\|>\s*$", re.MULTILINE)
_BLANK = re.compile(r"\n\s*\n")


def bundled_corpus() -> tuple[Path, Path]:
    """(train, validation) text files of the bundled TinyStories sample (CDLA-Sharing-1.0)."""
    root = Path(str(resources.files("flopwise") / "assets" / "tinystories"))
    return root / "train.txt", root / "valid.txt"


@dataclass
class Corpus:
    """A prepared corpus on disk."""

    path: Path
    meta: dict

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.model"

    def tokens(self, split: str) -> np.memmap:
        path = self.path / f"tokens-{split}.bin"
        try:
            return np.memmap(path, dtype=self.meta["dtype"], mode="r")
        except (OSError, ValueError) as e:  # missing, or a size that is not whole tokens: damaged
            raise FlopwiseError(f"{path} cannot be read as {self.meta['dtype']} tokens ({e}): prepare the corpus "
                                "again (delete the folder, then 'flopwise prepare')") from None

    def tokenizer(self):
        return load_tokenizer(self.tokenizer_path)


def open_corpus(path: str | Path) -> Corpus:
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise FlopwiseError(f"{path} is not a prepared corpus (no meta.json): run 'flopwise prepare' on it") from None
    return Corpus(path, meta)


# ---------------------------------------------------------------- reading text


def _expand(paths: list[Path]) -> list[Path]:
    files = []
    for p in paths:
        if not p.exists():
            raise FlopwiseError(f"{p} does not exist: give text files, folders of them, or JSONL with a 'text' field")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES
                           and not f.name.startswith("."))
            if not found:
                raise FlopwiseError(f"{p} holds no .txt, .md or .jsonl files")
            files += found
        else:
            files.append(p)
    return files


def _check_text(raw: bytes, path: Path) -> None:
    """Refuse binary data (an image, an archive, a model file): NUL bytes, or mostly bytes that are not UTF-8."""
    head = raw[: 1 << 20]
    bad = head.decode("utf-8", errors="replace").count("\ufffd") - head.count("\ufffd".encode())
    if b"\0" in head or bad > 0.1 * max(1, len(head)):
        raise FlopwiseError(f"{path} is not text (binary data): give text files (.txt, .md) or JSONL with a 'text' "
                            "field")


def _decode(raw: bytes, path: Path, stats: dict) -> str:
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.count("\ufffd".encode())
    if bad:
        stats["replaced"] = stats.get("replaced", 0) + bad
        stats.setdefault("files_with_bad_bytes", []).append(str(path))
    return text


def split_documents(text: str, on_blank_lines: bool = True) -> list[str]:
    """Documents of a text: split on <|endoftext|> lines when present, else on blank lines
    (or not at all when ``on_blank_lines`` is false: the whole text is one document)."""
    if _EOT.search(text):
        parts = _EOT.split(text)
    else:
        parts = _BLANK.split(text) if on_blank_lines else [text]
    return [p.strip("\n") for p in parts if p.strip()]


def read_documents(path: Path, stats: dict, whole_file: bool = False) -> list[str]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise FlopwiseError(f"cannot read {path}: {e.strerror}") from None
    _check_text(raw, path)
    text = _decode(raw, path, stats)
    if path.suffix.lower() not in (".jsonl", ".json"):
        return split_documents(text, on_blank_lines=not whole_file)
    docs = []
    for where, r in parse_records(text, str(path)):
        if not isinstance(r, dict) or not isinstance(r.get("text"), str):
            raise FlopwiseError(f"{path}: {where} has no string 'text' field")
        if r["text"].strip():
            docs.append(r["text"])
    return docs


# ---------------------------------------------------------------- encoding


def encode_documents(sp, docs: list[str], dtype) -> np.ndarray:
    """[bos] doc [eos] for every document, concatenated."""
    ids = sp.encode(docs)
    out = np.empty(sum(len(x) + 2 for x in ids), dtype=dtype)
    pos = 0
    for x in ids:
        out[pos] = BOS_ID
        out[pos + 1:pos + 1 + len(x)] = x
        out[pos + 1 + len(x)] = EOS_ID
        pos += len(x) + 2
    return out


def _content_hash(files: list[Path], val_files: list[Path], options: dict) -> str:
    h = hashlib.sha256(json.dumps({**options, "version": PREPARE_VERSION}, sort_keys=True).encode())
    for tag, group in (("train", files), ("val", val_files)):
        for f in group:
            h.update(f"{tag}:{f.name}:{f.stat().st_size}\n".encode())
            with open(f, "rb") as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def prepare(paths: list[str | Path] | None = None, out: str | Path | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE,
            val_paths: list[str | Path] | None = None, val_fraction: float = 0.05, seed: int = 0,
            log=print) -> Corpus:
    """Prepare a corpus (the bundled TinyStories sample when ``paths`` is empty); see the module doc."""
    if not paths:
        train, valid = bundled_corpus()
        paths, val_paths = [train], [valid]
    files = _expand([Path(p) for p in paths])
    val_files = _expand([Path(p) for p in val_paths]) if val_paths else []
    if not (256 + 3 <= vocab_size <= 1 << 20):
        raise FlopwiseError(f"--vocab-size must be between 259 (256 bytes + 3 specials) and 1048576, got {vocab_size}")
    if not (0 < val_fraction < 0.5):
        raise FlopwiseError(f"--val-fraction must be between 0 and 0.5, got {val_fraction}")
    options = {"vocab_size": vocab_size, "val_fraction": val_fraction if not val_files else None, "seed": seed}
    digest = _content_hash(files, val_files, options)
    out = Path(out) if out else cache_root() / "corpora" / digest[:16]
    check_output_dir(out, "--out", lambda p: (p / "meta.json").exists())  # a corpus flopwise prepared there
    if (out / "meta.json").exists():
        existing = open_corpus(out)
        if existing.meta.get("hash") == digest:
            return existing
    stats: dict = {}
    # one text file is split into documents; in a collection of files each file is one document
    docs = [d for f in files for d in read_documents(f, stats, whole_file=len(files) > 1)]
    if val_files:
        val_docs = [d for f in val_files for d in read_documents(f, stats, whole_file=len(val_files) > 1)]
        if not val_docs:
            raise FlopwiseError(f"--val {', '.join(map(str, val_paths))} holds no text: give a non-empty "
                                "validation file, or leave --val out to split documents off")
    else:
        order = np.random.default_rng(seed).permutation(len(docs))
        n_val = max(1, int(round(len(docs) * val_fraction))) if len(docs) >= 2 else 0
        val_idx = set(order[:n_val].tolist())
        val_docs = [d for i, d in enumerate(docs) if i in val_idx]
        docs = [d for i, d in enumerate(docs) if i not in val_idx]
    if not docs or not sum(len(d) for d in docs):
        raise FlopwiseError(f"the corpus ({', '.join(map(str, paths))}) holds no text: give non-empty files")
    if not val_docs:
        raise FlopwiseError("the corpus has a single document, too few to split off validation: add documents "
                            "or give --val FILE")
    if stats.get("replaced"):
        log(f"warning: replaced {stats['replaced']} invalid UTF-8 byte sequence(s) with U+FFFD in "
            f"{len(stats['files_with_bad_bytes'])} file(s), e.g. {stats['files_with_bad_bytes'][0]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    usual_mode(tmp)
    try:
        train_tokenizer(docs, vocab_size, tmp / "tokenizer.model", seed)
        sp = load_tokenizer(tmp / "tokenizer.model")
        dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
        train_ids = encode_documents(sp, docs, dtype)
        val_ids = encode_documents(sp, val_docs, dtype)
        if len(train_ids) < MIN_TRAIN_TOKENS:
            raise FlopwiseError(f"the corpus is only {len(train_ids)} tokens, shorter than a few context windows "
                                f"({MIN_TRAIN_TOKENS}): give more text")
        train_ids.tofile(tmp / "tokens-train.bin")
        val_ids.tofile(tmp / "tokens-val.bin")
        meta = {
            "version": PREPARE_VERSION, "hash": digest, "vocab_size": vocab_size,
            "dtype": np.dtype(dtype).name, "bos_id": BOS_ID, "eos_id": EOS_ID, "unk_id": UNK_ID,
            "n_tokens_train": int(len(train_ids)), "n_tokens_val": int(len(val_ids)),
            "n_docs_train": len(docs), "n_docs_val": len(val_docs),
            "bytes_train": sum(len(d.encode()) for d in docs), "bytes_val": sum(len(d.encode()) for d in val_docs),
            "sources": [str(f) for f in files], "val_sources": [str(f) for f in val_files] or "split",
            "replaced_bytes": stats.get("replaced", 0), "seed": seed,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old.{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return Corpus(out, meta)


def resolve_corpus(data: str | Path | None, vocab_size: int = DEFAULT_VOCAB_SIZE, log=print) -> Corpus:
    """A prepared corpus folder as is; anything else (text, folder, JSONL, None) is prepared into the cache."""
    if data is not None and (Path(data) / "meta.json").exists():
        return open_corpus(data)
    return prepare([data] if data is not None else None, vocab_size=vocab_size, log=log)
