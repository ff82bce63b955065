"""Encoding by words: the same tokens as SentencePiece, found from each distinct word once."""

import io
import random
import time

import numpy as np
import pytest
import sentencepiece as spm

import flopwise.data.prepare as prepare_module
from flopwise.data.prepare import bundled_corpus, prepare, split_documents
from flopwise.data.tokenizer import encode_by_words, encode_documents, encodes_by_words

pytest.importorskip("pyarrow")

EDGES = ["", " ", "  ", "a", " a", "a ", "a  b", "a \tb", "tab\there", "new\nline ", "\n\nx\n", "x\u2581y", "\u2581",
         "\u3000wide\u00a0nbsp", "digits 12345 and 3.14", "emoji 🙂 and 漢字 and ç", "<unk> <s> </s>", "a\u2028b",
         "trailing\n", " \n ", "z" * 3000, "many words " * 200]


def _random_docs(rng: random.Random, n: int) -> list[str]:
    atoms = ["the", "cat", " ", "  ", "\n", "\t", ",", ".", "é", "🙂", "\u2581", "0", "42", "Once", "x" * 40, "\u00a0"]
    return ["".join(rng.choice(atoms) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def test_encoding_by_words_equals_sentencepiece(bundled):
    sp = bundled.tokenizer()
    assert encodes_by_words(bundled.tokenizer_path.read_bytes())
    stories = split_documents(bundled_corpus()[1].read_text())[:300]
    docs = EDGES + stories + _random_docs(random.Random(0), 500)
    for dtype in (np.uint16, np.uint32):
        got = encode_by_words(sp, docs, dtype)
        assert got.dtype == dtype and np.array_equal(got, encode_documents(sp, docs, dtype))
    for doc in docs:  # each alone: a chunk of one document, of one that goes to SentencePiece whole, of ""
        assert np.array_equal(encode_by_words(sp, [doc], np.uint16), encode_documents(sp, [doc], np.uint16)), doc
    assert len(encode_by_words(sp, [], np.uint16)) == 0


def _model(**options) -> bytes:
    text = "\n".join(split_documents(bundled_corpus()[1].read_text())[:200])
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()), model_writer=model, vocab_size=300,
                                   model_type=options.pop("model_type", "bpe"), minloglevel=2, **options)
    return model.getvalue()


@pytest.mark.parametrize("options, by_words", [
    ({"normalization_rule_name": "identity", "remove_extra_whitespaces": False}, True),
    ({"normalization_rule_name": "nmt_nfkc", "remove_extra_whitespaces": False}, False),  # a character map
    ({"normalization_rule_name": "identity"}, False),  # spaces collapsed
    ({"normalization_rule_name": "identity", "remove_extra_whitespaces": False, "add_dummy_prefix": False}, False),
    ({"normalization_rule_name": "identity", "remove_extra_whitespaces": False, "treat_whitespace_as_suffix": True},
     False),
    ({"normalization_rule_name": "identity", "remove_extra_whitespaces": False, "user_defined_symbols": ["cat"]},
     False),
    ({"normalization_rule_name": "identity", "remove_extra_whitespaces": False, "split_by_whitespace": False},
     False),
    ({"normalization_rule_name": "identity", "remove_extra_whitespaces": False, "model_type": "unigram"}, False),
])
def test_only_tokenizers_whose_words_encode_alone_are_encoded_by_words(options, by_words):
    assert encodes_by_words(_model(**options)) is by_words


def _disagree_slowly(monkeypatch, seconds: float) -> list[int]:
    """prepare's encoders replaced: by words, always one off (a forced disagreement); SentencePiece, ``seconds``
    slower a call (the first chunk's check takes that long). Returns the chunk sizes encoded by words."""
    calls = []

    def wrong(sp, docs, dtype):
        calls.append(len(docs))
        return encode_by_words(sp, docs, dtype) + 1

    def slow(sp, docs, dtype):
        time.sleep(seconds)
        return encode_documents(sp, docs, dtype)

    monkeypatch.setattr(prepare_module, "encode_by_words", wrong)
    monkeypatch.setattr(prepare_module, "encode_documents", slow)
    return calls


def test_prepare_falls_back_to_sentencepiece_where_words_disagree(tmp_path, monkeypatch):
    """In chunks (small ones here, so many are in flight): the first chunk is checked against SentencePiece, and
    a disagreement (here a forced one) means SentencePiece encodes the whole corpus, every chunk after the first
    included however fast the reader is (the check is slowed here); the token files are SentencePiece's."""
    text = bundled_corpus()[1]
    monkeypatch.setattr(prepare_module._Writer, "CHUNK_CHARS", 50_000)
    monkeypatch.setattr(prepare_module, "_can_encode_by_words", lambda path: False)
    reference = prepare([text], out=tmp_path / "sentencepiece", vocab_size=512, log=lambda m: None)
    monkeypatch.undo()
    monkeypatch.setattr(prepare_module._Writer, "CHUNK_CHARS", 50_000)
    by_words = prepare([text], out=tmp_path / "words", vocab_size=512, log=lambda m: None)
    calls = _disagree_slowly(monkeypatch, 0.02)
    fallback = prepare([text], out=tmp_path / "fallback", vocab_size=512, log=lambda m: None)
    assert len(calls) == 1  # tried once, on the first chunk
    for split in ("train", "val"):
        assert np.array_equal(by_words.tokens(split), reference.tokens(split))
        assert np.array_equal(fallback.tokens(split), reference.tokens(split))


def test_no_chunk_is_encoded_by_words_before_the_first_one_is_checked(tmp_path, monkeypatch, bundled):
    """The reader can be at the next chunk while the first one's check is still running: that chunk waits for the
    verdict, here a disagreement, and is encoded by SentencePiece."""
    sp = bundled.tokenizer()
    _disagree_slowly(monkeypatch, 0.3)
    monkeypatch.setattr(prepare_module._Writer, "CHUNK_CHARS", 10)
    writer = prepare_module._Writer(sp, np.uint16, {"train": tmp_path / "t.bin"}, by_words=True)
    writer.add("train", "the first chunk")  # submitted: its check runs for 0.3 s
    time.sleep(0.1)
    writer.add("train", "the second chunk")  # flushed while the check runs
    writer.close()
    assert np.array_equal(np.fromfile(tmp_path / "t.bin", np.uint16),
                          encode_documents(sp, ["the first chunk", "the second chunk"], np.uint16))
