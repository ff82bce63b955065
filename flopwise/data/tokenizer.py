"""The tokenizer: SentencePiece BPE with byte fallback and Llama-2 special ids (unk 0, bos 1,
eos 2), the one form that GGUF's "llama" vocabulary, ollama and transformers all read alike.

It lives with the data (not the model) because preparing a corpus trains it, and ``data``
sits below ``model`` in the import layers.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import sentencepiece as spm

from flopwise.errors import FlopwiseError

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


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


def sentencepiece_model_type(model_proto: bytes) -> str:
    """'bpe', 'unigram', 'word' or 'char': ModelProto.trainer_spec (field 2) .model_type (field 3), read
    without the protobuf package (SentencePiece's Python module does not expose it)."""
    for number, value in _fields(model_proto):
        if number == 2:
            types = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}
            return next((types.get(v, "unknown") for n, v in _fields(value) if n == 3), "unigram")  # proto default
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
            out.append(len(sp.id_to_piece(i).replace("\u2581", " ").encode()))
    return out
