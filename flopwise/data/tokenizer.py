"""The tokenizer: SentencePiece BPE with byte fallback and Llama-2 special ids (unk 0, bos 1,
eos 2), the one form that GGUF's "llama" vocabulary, ollama and transformers all read alike.

It lives with the data (not the model) because preparing a corpus trains it, and ``data``
sits below ``model`` in the import layers.
"""

from __future__ import annotations

import io
import itertools
import os
from pathlib import Path

import numpy as np
import sentencepiece as spm

from flopwise.errors import FlopwiseError

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
SPACE = "\u2581"  # SentencePiece's word mark: a space, and the dummy prefix before a text's first word


def load_tokenizer(path: str | Path):
    return spm.SentencePieceProcessor(model_file=str(path))


def train_tokenizer(docs: list[str], vocab_size: int, out_path: Path, seed: int = 0) -> None:
    """SentencePiece BPE with byte fallback and Llama-2 special ids, trained on ``docs``."""
    model = io.BytesIO()
    lines = (line for d in docs for line in d.split("\n") if line.strip())
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines, model_writer=model, model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
            character_coverage=0.9995, split_digits=True, allow_whitespace_only_pieces=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
            max_sentence_length=1 << 16, num_threads=os.cpu_count() or 1, shuffle_input_sentence=False,
            minloglevel=2, hard_vocab_limit=True,
        )
    except RuntimeError as e:
        msg = str(e).splitlines()[-1] if str(e) else "tokenizer training failed"
        raise FlopwiseError(f"cannot train a {vocab_size}-token vocabulary on this corpus ({msg}): "
                            "use a smaller --vocab-size or more text") from None
    out_path.write_bytes(model.getvalue())


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def _fields(buf: bytes):
    """(field number, value) of a protobuf message's top-level fields: ints for varints, bytes otherwise."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire in (1, 5):
            value, pos = buf[pos:pos + (8 if wire == 1 else 4)], pos + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"protobuf wire type {wire}")
        yield number, value


# sentencepiece_model.proto's field numbers (and defaults, where a field is absent), read without the protobuf
# package: SentencePiece's Python module does not expose the model's settings
MODEL_PIECES, MODEL_TRAINER, MODEL_NORMALIZER = 1, 2, 3  # ModelProto
PIECE_TEXT, PIECE_TYPE, USER_DEFINED = 1, 3, 4  # ModelProto.SentencePiece: piece, type (NORMAL 1, ..., USER_DEFINED 4)
TRAINER_MODEL_TYPE, BPE = 3, 2  # TrainerSpec.model_type (UNIGRAM 1, BPE 2, WORD 3, CHAR 4; default UNIGRAM)
TRAINER_SPLIT_BY_SPACE, TRAINER_SPACE_AS_SUFFIX = 22, 24  # TrainerSpec: split_by_whitespace (true), ..._as_suffix
NORMALIZER_CHARSMAP, NORMALIZER_DUMMY_PREFIX = 2, 3  # NormalizerSpec: precompiled_charsmap, add_dummy_prefix (true)
NORMALIZER_REMOVE_SPACES, NORMALIZER_ESCAPE_SPACES = 4, 5  # remove_extra_whitespaces (true), escape_whitespaces (true)


def sentencepiece_model_type(model_proto: bytes) -> str:
    """'bpe', 'unigram', 'word' or 'char': the model's TrainerSpec.model_type."""
    for number, value in _fields(model_proto):
        if number == MODEL_TRAINER:
            types = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}
            return next((types.get(v, "unknown") for n, v in _fields(value) if n == TRAINER_MODEL_TYPE), "unigram")
    return "unigram"


def token_byte_lengths(sp) -> list[int]:
    """UTF-8 bytes each token id stands for (specials 0, byte pieces 1), for bits per byte.

    The '▁' that SentencePiece puts before a document's first word counts as one byte.
    """
    out = []
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i):
            out.append(0)
        elif sp.is_byte(i):
            out.append(1)
        else:
            out.append(len(sp.id_to_piece(i).replace(SPACE, " ").encode()))
    return out


def encode_documents(sp, docs: list[str], dtype) -> np.ndarray:
    """[bos] doc [eos] for every document, concatenated: SentencePiece's own encoder, its threads releasing the GIL."""
    ids = sp.encode(docs, num_threads=os.cpu_count() or 1)
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    out, starts = _framed(lengths, dtype)
    out[_ranges(starts + 1, lengths)] = np.fromiter(itertools.chain.from_iterable(ids), dtype, int(lengths.sum()))
    return out


def _framed(lengths: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Room for documents of ``lengths`` tokens as [bos] doc [eos] [bos] doc [eos] ..., the bos and eos written;
    and where each document's bos is."""
    starts = np.cumsum(lengths + 2) - (lengths + 2)
    out = np.empty(int((lengths + 2).sum()), dtype=dtype)
    out[starts] = BOS_ID
    out[starts + 1 + lengths] = EOS_ID
    return out, starts


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """start, start + 1, ..., start + length - 1 for every (start, length), concatenated."""
    ends = np.cumsum(lengths)
    return np.arange(int(ends[-1]) if len(ends) else 0) + np.repeat(starts - (ends - lengths), lengths)


def encodes_by_words(model_proto: bytes) -> bool:
    """Whether a text whose words are separated by single spaces encodes as its words do one by one (each with the
    dummy prefix SentencePiece puts before a text): true of a BPE model that adds that prefix, neither normalises
    characters (no character map) nor collapses spaces, marks a word by '▁' at its start, and has no piece that
    could join two words (a user-defined piece, matched anywhere, or one with '▁' after another character). The
    tokenizers ``train_tokenizer`` makes, and Llama-2's, are such models."""
    trainer = normalizer = b""
    for number, value in _fields(model_proto):
        if number == MODEL_PIECES:
            fields = dict(_fields(value))
            piece = fields.get(PIECE_TEXT, b"").decode("utf-8", errors="replace")
            if fields.get(PIECE_TYPE, 1) == USER_DEFINED or SPACE in piece.lstrip(SPACE):  # a mark inside a piece
                return False
        elif number == MODEL_TRAINER:
            trainer = value
        elif number == MODEL_NORMALIZER:
            normalizer = value
    t, n = dict(_fields(trainer)), dict(_fields(normalizer))
    return (t.get(TRAINER_MODEL_TYPE, 1) == BPE and t.get(TRAINER_SPACE_AS_SUFFIX, 0) == 0
            and t.get(TRAINER_SPLIT_BY_SPACE, 1) == 1 and not n.get(NORMALIZER_CHARSMAP)
            and n.get(NORMALIZER_DUMMY_PREFIX, 1) == 1 and n.get(NORMALIZER_REMOVE_SPACES, 1) == 0
            and n.get(NORMALIZER_ESCAPE_SPACES, 1) == 1)


def encode_by_words(sp, docs: list[str], dtype) -> np.ndarray:
    """``encode_documents``'s tokens, for a tokenizer that ``encodes_by_words``, found faster: the documents'
    distinct space-separated words (a few percent of the text) go to SentencePiece, and each document is its
    words' tokens in order, gathered with Arrow and NumPy instead of encoded character by character. Documents
    with what the word split does not cover (a space at either end or beside another, an '▁' of their own) go
    to SentencePiece whole. Needs pyarrow."""
    import pyarrow as pa
    import pyarrow.compute as pc

    texts = pa.array(docs, pa.large_string())
    whole = pc.match_substring_regex(texts, f"^ |  | $|{SPACE}").to_numpy(zero_copy_only=False)
    threads = os.cpu_count() or 1
    segments = pc.split_pattern(texts.filter(pa.array(~whole)), " ")
    words = pc.dictionary_encode(segments.flatten())
    word_ids = sp.encode(words.dictionary.to_pylist(), num_threads=threads)
    word_lengths = np.fromiter(map(len, word_ids), np.int64, len(word_ids))
    table = np.fromiter(itertools.chain.from_iterable(word_ids), dtype, int(word_lengths.sum()))
    word = words.indices.to_numpy(zero_copy_only=False)
    per_word = word_lengths[word]
    per_doc = np.zeros(len(docs), np.int64)
    counts = np.diff(segments.offsets.to_numpy())  # words per document (a document has at least one)
    if len(counts):
        per_doc[~whole] = np.add.reduceat(per_word, np.cumsum(counts) - counts)
    odd = sp.encode([docs[i] for i in np.flatnonzero(whole)], num_threads=threads) if whole.any() else []
    per_doc[whole] = np.fromiter(map(len, odd), np.int64, len(odd))
    out, starts = _framed(per_doc, dtype)
    out[_ranges(starts[~whole] + 1, per_doc[~whole])] = table[_ranges((np.cumsum(word_lengths) - word_lengths)[word],
                                                                      per_word)]
    if len(odd):  # spliced in where they belong
        out[_ranges(starts[whole] + 1, per_doc[whole])] = np.fromiter(itertools.chain.from_iterable(odd), dtype,
                                                                      int(per_doc[whole].sum()))
    return out
