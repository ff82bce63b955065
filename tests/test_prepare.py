import json
import os

import numpy as np
import pytest

from flopwise.data.prepare import bundled_corpus, open_corpus, prepare, resolve_corpus, split_documents
from flopwise.data.tokenizer import BOS_ID, EOS_ID, UNK_ID, token_byte_lengths
from flopwise.errors import FlopwiseError


def test_bundled_corpus_ships_with_license():
    train, valid = bundled_corpus()
    folder = train.parent
    assert (folder / "SOURCE.md").read_text().startswith("# TinyStories sample")
    assert "Community Data License Agreement" in (folder / "LICENSE-CDLA-Sharing-1.0.txt").read_text()
    assert train.stat().st_size == 2096346 and valid.stat().st_size == 794375


def test_prepared_bundled_corpus(bundled):
    m = bundled.meta
    assert m["vocab_size"] == 1024 and m["dtype"] == "uint16"
    assert m["n_docs_train"] == 2316  # one per <|endoftext|>-separated story
    train = bundled.tokens("train")
    assert len(train) == m["n_tokens_train"] and train[0] == BOS_ID and train[-1] == EOS_ID
    assert int((np.asarray(train) == EOS_ID).sum()) == m["n_docs_train"]
    sp = bundled.tokenizer()
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (UNK_ID, BOS_ID, EOS_ID)
    assert sp.get_piece_size() == 1024


@pytest.mark.parametrize("text", ["Once upon a time, Lily saw a big dog.", "naïve café — 東京 😀 Ω≈ç√",
                                  "tabs\tand\nnew lines\n\n  spaces", "1234567890 $%^&*()"])
def test_tokenizer_round_trip(bundled, text):
    sp = bundled.tokenizer()
    ids = sp.encode(text)
    assert UNK_ID not in ids  # byte fallback: nothing is unknown
    assert sp.decode(ids) == text


def test_token_byte_lengths_sum_to_text_bytes(bundled):
    sp = bundled.tokenizer()
    lengths = token_byte_lengths(sp)
    text = "The cat sat. 東京 😀"
    # the leading '▁' SentencePiece adds counts one byte
    assert sum(lengths[i] for i in sp.encode(text)) == len(text.encode()) + 1


def test_prepare_is_deterministic_and_cached(tmp_path):
    src = tmp_path / "corpus.txt"
    train, _ = bundled_corpus()
    src.write_bytes(train.read_bytes()[:300_000])
    a = prepare([src], out=tmp_path / "a", vocab_size=512)
    b = prepare([src], out=tmp_path / "b", vocab_size=512)
    for name in ("tokens-train.bin", "tokens-val.bin", "tokenizer.model"):
        assert (a.path / name).read_bytes() == (b.path / name).read_bytes()
    mtime = (a.path / "meta.json").stat().st_mtime_ns
    again = prepare([src], out=tmp_path / "a", vocab_size=512)
    assert (again.path / "meta.json").stat().st_mtime_ns == mtime  # nothing rebuilt
    assert resolve_corpus(tmp_path / "a").meta["hash"] == a.meta["hash"]
    c = prepare([src], out=tmp_path / "c", vocab_size=600)
    assert c.meta["hash"] != a.meta["hash"]


def test_documents_and_validation_split(tmp_path):
    assert split_documents("a\n<|endoftext|>\nb\n\nc\n<|endoftext|>\n") == ["a", "b\n\nc"]
    assert split_documents("one\n\ntwo\n \nthree") == ["one", "two", "three"]
    folder = tmp_path / "docs"
    folder.mkdir()
    train, _ = bundled_corpus()
    stories = train.read_text().split("<|endoftext|>")[:400]
    for i, s in enumerate(stories):
        (folder / f"{i:03d}.txt").write_text(s)
    c = prepare([folder], out=tmp_path / "p", vocab_size=400, val_fraction=0.1)
    assert c.meta["n_docs_val"] == 40 and c.meta["n_docs_train"] == 360


def test_jsonl_and_bad_bytes(tmp_path, capsys):
    train, _ = bundled_corpus()
    stories = [s.strip() for s in train.read_text().split("<|endoftext|>")[:300]]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"text": s}) for s in stories))
    c = prepare([path], out=tmp_path / "j", vocab_size=400)
    assert c.meta["n_docs_train"] + c.meta["n_docs_val"] == 300
    bad = tmp_path / "bad.txt"
    bad.write_bytes(("\n\n".join(stories)).encode() + b"\n\nbroken \xff\xfe bytes here\n")
    messages = []
    c = prepare([bad], out=tmp_path / "b", vocab_size=400, log=messages.append)
    assert c.meta["replaced_bytes"] == 2
    assert any("replaced 2 invalid UTF-8" in m for m in messages)


def test_bad_corpora(tmp_path, monkeypatch):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(FlopwiseError, match="holds no text|single document"):
        prepare([empty], out=tmp_path / "e")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("\n\n".join(f"story {i} is short." for i in range(40)))
    with pytest.raises(FlopwiseError, match="shorter than a few context windows|vocabulary"):
        prepare([tiny], out=tmp_path / "t", vocab_size=300)
    with pytest.raises(FlopwiseError, match="does not exist"):
        prepare([tmp_path / "missing.txt"])
    with pytest.raises(FlopwiseError, match="holds no files flopwise reads"):
        (tmp_path / "nothing").mkdir()
        prepare([tmp_path / "nothing"])
    js = tmp_path / "x.jsonl"
    js.write_text('{"text": "fine"}\n{"txt": "no"}\n')
    with pytest.raises(FlopwiseError, match=r"record 1 \(line 2\) has no 'text' field \(its fields: txt\): "
                                            "give --text-field"):
        prepare([js])
    js.write_text('{"text": "fine"}\n{broken\n')
    with pytest.raises(FlopwiseError, match="line 2 is not valid JSON"):
        prepare([js])
    unreadable = tmp_path / "locked.txt"
    unreadable.write_text("x")

    real_open = open

    def deny(path, *args, **kwargs):  # root reads any file whatever its mode: refuse this one by name
        if str(path).endswith("locked.txt"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", deny)
    with pytest.raises(FlopwiseError, match="cannot read .*locked.txt: Permission denied"):
        prepare([unreadable], out=tmp_path / "u")
    with pytest.raises(FlopwiseError, match="not a prepared corpus"):
        open_corpus(tmp_path)


def test_prepare_never_deletes_or_overwrites_what_the_user_had(tmp_path):
    """--out that holds the user's files, or is a file, is refused before any work; the user's bytes stay."""
    text = tmp_path / "small.txt"
    text.write_text("\n\n".join(f"Story {i}: the cat sat on the mat and looked at the {i} birds." for i in range(300)))
    mine = tmp_path / "v"
    (mine / "sub").mkdir(parents=True)
    (mine / "a.md").write_text("my notes")
    (mine / "sub" / "b.txt").write_text("more")
    with pytest.raises(FlopwiseError, match="holds other files: give a new or empty folder"):
        prepare([text], out=mine, vocab_size=300)
    assert (mine / "a.md").read_text() == "my notes" and (mine / "sub" / "b.txt").read_text() == "more"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.txt", "v"]  # no temp folder left either
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    with pytest.raises(FlopwiseError, match="is a file: give a folder"):
        prepare([text], out=a_file, vocab_size=300)
    assert a_file.read_text() == "mine"
    corpus = prepare([text], out=tmp_path / "c", vocab_size=300)  # a corpus of ours is replaced when re-prepared
    again = prepare([text], out=tmp_path / "c", vocab_size=320)
    assert again.vocab_size == 320 and corpus.path == again.path
    umask = os.umask(0)
    os.umask(umask)
    assert ((tmp_path / "c").stat().st_mode & 0o777) == 0o777 & ~umask  # not mkdtemp's 0700
