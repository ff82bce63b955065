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
import heapq
import json
import os
import shutil
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import sentencepiece as spm

from flopwise.data.sources import Source, documents, expand, split_documents  # noqa: F401 (split_documents: API)
from flopwise.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    UNK_ID,
    encode_by_words,
    encode_documents,
    encodes_by_words,
    load_tokenizer,
    sentencepiece_model_type,
    train_tokenizer,
)
from flopwise.errors import FlopwiseError
from flopwise.fsutil import cache_root, check_output_dir, usual_mode
from flopwise.progress import Bar

DEFAULT_VOCAB_SIZE = 4096
DEFAULT_TOKENIZER_SAMPLE_MB = 32  # million characters of training documents the tokenizer learns from
PREPARE_VERSION = 2  # bump when the output of prepare() changes for the same input
MIN_TRAIN_TOKENS = 2048


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


# ---------------------------------------------------------------- the passes


def _content_hash(sources: list[Source], val_sources: list[Source], options: dict, bar: Bar) -> str:
    """sha256 of the options and every source's name, size and bytes (streamed)."""
    h = hashlib.sha256(json.dumps({**options, "version": PREPARE_VERSION}, sort_keys=True).encode())
    done = 0
    for tag, group in (("train", sources), ("val", val_sources)):
        for src in group:
            h.update(f"{tag}:{src.path.name}:{src.size}\n".encode())
            try:
                with open(src.path, "rb") as fh:
                    for block in iter(lambda fh=fh: fh.read(1 << 22), b""):
                        h.update(block)
                        done += len(block)
                        bar.update(done)
            except OSError as e:
                raise FlopwiseError(f"cannot read {src.path}: {e.strerror}") from None
    return h.hexdigest()


def _stream(sources: list[Source], text_field: str, stats: dict, counter: list[int], eot_seen: dict):
    """Every document of the sources in order; in a collection of text files each file is one document."""
    whole_file = len(sources) > 1
    for src in sources:
        yield from documents(src, text_field, whole_file, stats, counter, eot_seen)


class _Sample:
    """A uniform random sample of documents, at most ``budget_chars`` long in all: every document gets a
    seeded random key and the lowest keys are kept (a bottom-k sample bounded by length, one pass)."""

    def __init__(self, budget_chars: int, seed: int):
        self.budget, self.rng, self.heap, self.chars = budget_chars, np.random.default_rng(seed), [], 0
        self.keys = np.empty(0)

    def add(self, index: int, doc: str) -> None:
        if index % 65536 == 0:
            self.keys = self.rng.random(65536)  # drawn in blocks: the same keys for the same documents
        key = -self.keys[index % 65536]
        if self.chars + len(doc) > self.budget and self.heap and key < self.heap[0][0]:
            return  # a higher key than all kept, and no room: it would be dropped at once
        heapq.heappush(self.heap, (key, index, doc))
        self.chars += len(doc)
        while self.chars > self.budget and len(self.heap) > 1:
            self.chars -= len(heapq.heappop(self.heap)[2])

    def documents(self, exclude) -> list[str]:
        """The sample in corpus order, without the documents ``exclude(index)`` holds out."""
        return [doc for _, i, doc in sorted(self.heap, key=lambda t: t[1]) if not exclude(i)]


class _Writer:
    """Encodes chunks of documents in two threads while the main one reads the next chunk (SentencePiece's encoding,
    Arrow's kernels and NumPy's gathers release the GIL), and appends the tokens to the split's file in order. Bytes
    and tokens per split are counted."""

    CHUNK_CHARS = 4 << 20
    IN_FLIGHT = 2  # chunks being encoded at once: memory stays a few chunks
    CHECK_DOCS = 2000  # the first chunk's first documents are encoded by SentencePiece too, and must agree

    def __init__(self, sp, dtype, files: dict[str, Path], by_words: bool = False):
        self.sp, self.dtype = sp, dtype
        self.by_words = by_words  # encode_by_words, kept only if its first chunk agrees with SentencePiece
        self.checked = not by_words  # until checked, one chunk at a time: the first decides how the rest encode
        self.fh = {split: open(path, "wb") for split, path in files.items()}
        self.tokens = dict.fromkeys(files, 0)
        self.utf8_bytes = dict.fromkeys(files, 0)
        self.pool = ThreadPoolExecutor(self.IN_FLIGHT)
        self.pending: deque = deque()
        self.chunk: dict[str, list[str]] = {split: [] for split in files}
        self.chars = 0

    def add(self, split: str, doc: str) -> None:
        self.chunk[split].append(doc)
        self.chars += len(doc)
        if self.chars >= self.CHUNK_CHARS:
            self.flush()

    def flush(self) -> None:
        while len(self.pending) >= self.IN_FLIGHT or (self.pending and not self.checked):
            self._wait_one()  # the first chunk decides how the others are encoded
        chunk, self.chunk, self.chars = self.chunk, {split: [] for split in self.fh}, 0
        before = self.pending[-1] if self.pending else None
        self.pending.append(self.pool.submit(self._write, chunk, before))

    def _wait_one(self) -> None:
        try:
            self.pending.popleft().result()
        except OSError as e:
            raise FlopwiseError(f"cannot write the token files ({e.strerror}): free some space or choose "
                                "another --out") from None

    def _write(self, chunk: dict[str, list[str]], before) -> None:
        encoded = {split: (self._encode(docs), sum(len(d.encode()) for d in docs))
                   for split, docs in chunk.items() if docs}
        if before is not None:
            before.result()  # the chunk before is written first (or failed: then this one is not written)
        for split, (ids, utf8_bytes) in encoded.items():
            ids.tofile(self.fh[split])
            self.tokens[split] += len(ids)
            self.utf8_bytes[split] += utf8_bytes

    def _encode(self, docs: list[str]) -> np.ndarray:
        if not self.by_words:
            return encode_documents(self.sp, docs, self.dtype)
        ids = encode_by_words(self.sp, docs, self.dtype)
        if not self.checked:  # belt and braces, for a tokenizer whose settings pass but whose words do not
            reference = encode_documents(self.sp, docs[:self.CHECK_DOCS], self.dtype)
            self.by_words = np.array_equal(reference, ids[:len(reference)])
            self.checked = True  # last: flush() submits the next chunk once this is set
            if not self.by_words:
                return encode_documents(self.sp, docs, self.dtype)
        return ids

    def close(self) -> None:
        """Write what is left and close the files (raises what writing raised)."""
        self.flush()
        while self.pending:
            self._wait_one()
        self.abort()

    def abort(self) -> None:
        """Stop without writing more (on an error or Ctrl-C); closing twice is harmless."""
        self.pool.shutdown(cancel_futures=True)
        for fh in self.fh.values():
            fh.close()


def _can_encode_by_words(tokenizer_path: Path) -> bool:
    """encode_by_words serves (it needs pyarrow, from flopwise[data]) and gives this tokenizer's tokens."""
    try:
        import pyarrow.compute  # noqa: F401
    except ImportError:
        return False
    return encodes_by_words(tokenizer_path.read_bytes())


def _tokenizer_options(path: Path) -> dict:
    """What a reused tokenizer is: its size, its bytes, and the content hash that keys the corpus."""
    if not path.is_file():
        raise FlopwiseError(f"--tokenizer {path} does not exist: give a SentencePiece tokenizer.model file")
    try:
        raw = path.read_bytes()
        sp = spm.SentencePieceProcessor(model_proto=raw)
    except (OSError, RuntimeError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FlopwiseError(f"--tokenizer {path} is not a SentencePiece model ({why}): give a tokenizer.model "
                            "file") from None
    ids = (sp.unk_id(), sp.bos_id(), sp.eos_id())
    if ids != (UNK_ID, BOS_ID, EOS_ID):
        raise FlopwiseError(f"--tokenizer {path} has unk/bos/eos ids {ids}, not Llama's ({UNK_ID}, {BOS_ID}, "
                            f"{EOS_ID}) that flopwise's token files and exports use: give a Llama-style tokenizer")
    model_type = sentencepiece_model_type(raw)
    if model_type != "bpe":
        raise FlopwiseError(f"--tokenizer {path} is a {model_type} model; flopwise exports BPE tokenizers (as Llama's "
                            "is): give a BPE tokenizer, or leave --tokenizer out to train one")
    return {"vocab_size": sp.get_piece_size(), "sha256": hashlib.sha256(raw).hexdigest(), "bytes": raw}


def prepare(paths: list[str | Path] | None = None, out: str | Path | None = None, vocab_size: int | None = None,
            val_paths: list[str | Path] | None = None, val_fraction: float = 0.05, seed: int = 0,
            log=print, text_field: str = "text", tokenizer: str | Path | None = None,
            tokenizer_sample_mb: float = DEFAULT_TOKENIZER_SAMPLE_MB, quiet: bool | None = None) -> Corpus:
    """Prepare a corpus (the bundled TinyStories sample when ``paths`` is empty); see the module doc.

    ``vocab_size`` defaults to DEFAULT_VOCAB_SIZE, or follows ``tokenizer`` (an existing SentencePiece
    model to reuse instead of training one). The tokenizer is trained on a seeded random sample of
    at most ``tokenizer_sample_mb`` million characters of training documents. Progress bars show on
    stderr for corpora of 64 MB and more unless ``quiet``.
    """
    if not paths:
        train, valid = bundled_corpus()
        paths, val_paths = [train], [valid]
    if not (0 < val_fraction < 0.5):
        raise FlopwiseError(f"--val-fraction must be between 0 and 0.5, got {val_fraction}")
    if not tokenizer_sample_mb > 0:
        raise FlopwiseError(f"--tokenizer-sample-mb must be positive, got {tokenizer_sample_mb}")
    if not text_field:
        raise FlopwiseError("--text-field must name a field, got an empty one")
    reuse = _tokenizer_options(Path(tokenizer)) if tokenizer else None
    if reuse and vocab_size not in (None, reuse["vocab_size"]):
        raise FlopwiseError(f"--vocab-size {vocab_size} differs from --tokenizer's {reuse['vocab_size']} tokens: "
                            "leave --vocab-size out (it follows the tokenizer)")
    vocab_size = reuse["vocab_size"] if reuse else (vocab_size or DEFAULT_VOCAB_SIZE)
    if not (256 + 3 <= vocab_size <= 1 << 20):
        raise FlopwiseError(f"--vocab-size must be between 259 (256 bytes + 3 specials) and 1048576, got {vocab_size}")
    sources = expand([Path(p) for p in paths], log)
    val_sources = expand([Path(p) for p in val_paths], log) if val_paths else []
    total_bytes = sum(s.size for s in sources + val_sources)
    quiet = total_bytes < 64 << 20 if quiet is None else quiet
    options = {"vocab_size": vocab_size, "val_fraction": val_fraction if not val_sources else None, "seed": seed,
               "text_field": text_field, "tokenizer": reuse["sha256"] if reuse else None,
               "tokenizer_sample_mb": None if reuse else tokenizer_sample_mb}
    with Bar("hashing", total_bytes, quiet=quiet) as bar:
        digest = _content_hash(sources, val_sources, options, bar)
    out = Path(out) if out else cache_root() / "corpora" / digest[:16]
    check_output_dir(out, "--out", lambda p: (p / "meta.json").exists())  # a corpus flopwise prepared there
    if (out / "meta.json").exists():
        existing = open_corpus(out)
        if existing.meta.get("hash") == digest:
            return existing

    # pass 1: count the documents (for a split by document) and sample them for the tokenizer
    stats: dict = {}
    eot_seen: dict = {}
    counter = [0]
    sample = _Sample(int(tokenizer_sample_mb * 1e6), seed)
    n_docs = n_chars = 0
    with Bar("reading", total_bytes, quiet=quiet) as bar:
        for doc in _stream(sources, text_field, stats, counter, eot_seen):
            if not reuse:
                sample.add(n_docs, doc)
            n_docs += 1
            n_chars += len(doc)
            if n_docs % 1024 == 0:
                bar.update(counter[0], f"{n_docs:,} documents")
        n_val_docs = 0
        for _ in _stream(val_sources, text_field, stats, counter, eot_seen):
            n_val_docs += 1
            if n_val_docs % 1024 == 0:
                bar.update(counter[0], f"{n_docs + n_val_docs:,} documents")
    if val_sources:
        held_out = np.zeros(n_docs, dtype=bool)
        if not n_val_docs:
            raise FlopwiseError(f"--val {', '.join(map(str, val_paths))} holds no text: give a non-empty "
                                "validation file, or leave --val out to split documents off")
    else:  # the same split as ever: the first documents of a seeded permutation are held out
        order = np.random.default_rng(seed).permutation(n_docs)
        n_val_docs = max(1, int(round(n_docs * val_fraction))) if n_docs >= 2 else 0
        held_out = np.zeros(n_docs, dtype=bool)
        held_out[order[:n_val_docs]] = True
        del order
    if not n_docs - (0 if val_sources else n_val_docs) or not n_chars:
        nulls = stats.get("null_records")
        raise FlopwiseError(f"the corpus ({', '.join(map(str, paths))}) holds no text"
                            + (f": all {nulls:,} of its records have a null '{text_field}': check --text-field"
                               if nulls else ": give non-empty files"))
    if not n_val_docs:
        raise FlopwiseError("the corpus has a single document, too few to split off validation: add documents "
                            "or give --val FILE")
    if stats.get("replaced"):
        log(f"warning: replaced {stats['replaced']} invalid UTF-8 byte sequence(s) with U+FFFD in "
            f"{len(stats['files_with_bad_bytes'])} file(s), e.g. {stats['files_with_bad_bytes'][0]}")
    if stats.get("null_records"):
        log(f"note: skipped {stats['null_records']:,} record(s) whose '{text_field}' is null")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    usual_mode(tmp)
    try:
        if reuse:
            (tmp / "tokenizer.model").write_bytes(reuse["bytes"])
            sampled = None
        else:
            docs = sample.documents(lambda i: held_out[i])
            sampled = {"documents": len(docs), "chars": sum(map(len, docs)), "seed": seed,
                       "limit_mb": tokenizer_sample_mb}
            del sample
            if n_chars > tokenizer_sample_mb * 1e6:
                log(f"note: training the tokenizer on a {sampled['chars'] / 1e6:,.0f}M-character random sample "
                    f"({len(docs):,} of {n_docs:,} documents; --tokenizer-sample-mb sets its size)")
            train_tokenizer(docs, vocab_size, tmp / "tokenizer.model", seed)
            del docs
        sp = load_tokenizer(tmp / "tokenizer.model")
        dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32

        # pass 2: encode, in a second thread, into the two token files
        counter[0] = 0
        writer = _Writer(sp, dtype, {"train": tmp / "tokens-train.bin", "val": tmp / "tokens-val.bin"},
                         by_words=_can_encode_by_words(tmp / "tokenizer.model"))
        try:
            with Bar("encoding", total_bytes, quiet=quiet) as bar:
                start = time.perf_counter()
                i = -1
                for i, doc in enumerate(_stream(sources, text_field, {}, counter, eot_seen)):
                    if i >= n_docs:
                        break
                    writer.add("val" if held_out[i] else "train", doc)
                    if i % 1024 == 0:
                        rate = counter[0] / 1e6 / max(time.perf_counter() - start, 1e-9)
                        bar.update(counter[0], f"{rate:.1f} MB/s")
                if i + 1 != n_docs:
                    raise FlopwiseError(f"the corpus changed while it was read ({n_docs:,} documents, then "
                                        f"{'more' if i >= n_docs else f'{i + 1:,}'}): prepare it again when no "
                                        "program writes to it")
                for doc in _stream(val_sources, text_field, {}, counter, eot_seen):
                    writer.add("val", doc)
            writer.close()
        finally:
            writer.abort()
        if writer.tokens["train"] < MIN_TRAIN_TOKENS:
            raise FlopwiseError(f"the corpus is only {writer.tokens['train']} tokens, shorter than a few context "
                                f"windows ({MIN_TRAIN_TOKENS}): give more text")
        meta = {
            "version": PREPARE_VERSION, "hash": digest, "vocab_size": vocab_size,
            "dtype": np.dtype(dtype).name, "bos_id": BOS_ID, "eos_id": EOS_ID, "unk_id": UNK_ID,
            "n_tokens_train": writer.tokens["train"], "n_tokens_val": writer.tokens["val"],
            "n_docs_train": int(n_docs - (0 if val_sources else n_val_docs)), "n_docs_val": int(n_val_docs),
            "bytes_train": writer.utf8_bytes["train"], "bytes_val": writer.utf8_bytes["val"],
            "sources": [str(s.path) for s in sources], "val_sources": [str(s.path) for s in val_sources] or "split",
            "replaced_bytes": stats.get("replaced", 0), "null_records": stats.get("null_records", 0), "seed": seed,
            "text_field": text_field, "tokenizer": str(Path(tokenizer).resolve()) if reuse else "trained",
            "tokenizer_sample": sampled,
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
