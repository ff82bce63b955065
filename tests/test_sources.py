"""Corpus formats (text, JSONL/JSON, compressed, Parquet, Arrow, saved datasets), the streaming split,
the tokenizer's sample and reuse."""

import bz2
import gzip
import json
import lzma
import random
import re

import numpy as np
import pytest

from flopwise.data.prepare import bundled_corpus, prepare
from flopwise.data.sources import (
    _BLANK,
    _EOT,
    _separators,
    _split_stream,
    documents,
    expand,
    source_of,
    split_documents,
)
from flopwise.data.tokenizer import sentencepiece_model_type
from flopwise.errors import FlopwiseError


@pytest.fixture(scope="module")
def stories():
    train, _ = bundled_corpus()
    return [s.strip() for s in train.read_text().split("<|endoftext|>") if s.strip()][:600]


def _docs(path, **kw):
    return [d for src in expand([path]) for d in documents(src, **kw)]


def test_streaming_split_equals_the_whole_text_split():
    """Text arrives in blocks cut at line ends; the documents must not depend on where the cuts fall."""
    rng = random.Random(0)
    atoms = ["a", "b c", "", " ", "\t", "<|endoftext|>", " <|endoftext|> ", "x<|endoftext|>", "\r", "é", "\u00a0",
             "\u00a0<|endoftext|>", "<|endoftext|>\x0b", "<|endoftext|><|endoftext|>", "\x1c"]
    for _ in range(3000):
        text = "\n".join(rng.choice(atoms) for _ in range(rng.randint(0, 30))) + rng.choice(["", "\n"])
        lines = text.splitlines(keepends=True)
        cuts = sorted(rng.sample(range(len(lines) + 1), min(len(lines) + 1, rng.randint(1, 6))))
        pieces = ["".join(lines[a:b]) for a, b in zip([0] + cuts, cuts + [len(lines)], strict=True)]
        sep = _EOT if _EOT.search(text) else _BLANK
        assert list(_split_stream(iter(pieces), sep)) == split_documents(text), repr(text)


def test_the_separator_search_finds_what_the_regex_finds():
    """<|endoftext|> lines are found from the token's occurrences, not by trying the regex at every character:
    the same matches, whatever whitespace (Unicode's too) and stray tokens surround them."""
    rng = random.Random(1)
    atoms = ["<|endoftext|>", "\n", " ", "\t", "\u00a0", "\u2028", "\x1c", "a", "<|endo", "\r\n", "\n\n"]
    for _ in range(5000):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 25)))
        assert _separators(text, _EOT) == [m.span() for m in _EOT.finditer(text)], repr(text)


def test_large_text_streams_in_blocks(tmp_path, stories, monkeypatch):
    monkeypatch.setattr("flopwise.data.sources.BLOCK_BYTES", 1000)  # many blocks, stories cut across them
    text = "\n<|endoftext|>\n".join(stories[:200]) + "\n"
    (tmp_path / "a.txt").write_text(text)
    assert _docs(tmp_path / "a.txt") == split_documents(text)
    blank = "\n\n".join(re.sub(r"\n\s*\n", "\n", s) for s in stories[:200])
    (tmp_path / "b.txt").write_text(blank)
    assert _docs(tmp_path / "b.txt") == split_documents(blank) and len(split_documents(blank)) == 200


@pytest.mark.parametrize("suffix,opener", [(".gz", gzip.open), (".xz", lzma.open), (".bz2", bz2.open), (".zst", None)])
def test_compressed_text_and_jsonl(tmp_path, stories, suffix, opener):
    if opener is None:
        zstandard = pytest.importorskip("zstandard")

        def opener(path, mode):
            return zstandard.open(path, mode)
    with opener(tmp_path / f"s.txt{suffix}", "wt") as f:
        f.write("\n<|endoftext|>\n".join(stories[:50]))
    with opener(tmp_path / f"s.jsonl{suffix}", "wt") as f:
        f.writelines(json.dumps({"body": s, "id": i}) + "\n" for i, s in enumerate(stories[:50]))
    assert _docs(tmp_path / f"s.txt{suffix}") == stories[:50]
    assert _docs(tmp_path / f"s.jsonl{suffix}", text_field="body") == stories[:50]


def test_damaged_compressed_file_names_it(tmp_path, stories):
    raw = gzip.compress("\n\n".join(stories).encode())
    (tmp_path / "cut.txt.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(FlopwiseError, match=r"cut.txt.gz is damaged or not .gz"):
        _docs(tmp_path / "cut.txt.gz")
    bad = bytearray(raw)
    bad[len(raw) // 2: len(raw) // 2 + 64] = bytes(64)  # a damaged middle: zlib's own error, not an OSError
    (tmp_path / "hole.txt.gz").write_bytes(bytes(bad))
    with pytest.raises(FlopwiseError, match=r"hole.txt.gz is damaged or not .gz"):
        _docs(tmp_path / "hole.txt.gz")


def test_a_long_document_without_separators_streams_whole(tmp_path, stories, monkeypatch):
    monkeypatch.setattr("flopwise.data.sources.BLOCK_BYTES", 500)  # hundreds of blocks, no blank line in any
    text = "\n".join(re.sub(r"\s*\n\s*", " ", s) for s in stories[:300]) + "\n\n" + stories[300]
    (tmp_path / "lines.txt").write_text(text)
    assert _docs(tmp_path / "lines.txt") == split_documents(text) and len(split_documents(text)) == 2


def test_json_records_name_file_row_and_field(tmp_path, stories):
    path = tmp_path / "r.json"
    path.write_text(json.dumps([{"text": s} for s in stories[:5]]))
    assert _docs(path) == stories[:5]
    path.write_text(json.dumps([{"text": "fine"}, {"text": 7}]))
    with pytest.raises(FlopwiseError, match=r"r.json: record 1 field 'text' is int, not text"):
        _docs(path)
    lines = tmp_path / "r.jsonl"
    lines.write_text('{"content": "a"}\n\n{"content": null}\n{"content": "b"}\n{"title": "c"}\n')
    stats = {}
    with pytest.raises(FlopwiseError, match=r"r.jsonl: record 3 \(line 5\) has no 'content' field "
                                            r"\(its fields: title\)"):
        [d for src in expand([lines]) for d in documents(src, "content", stats=stats)]
    assert stats["null_records"] == 1


def test_parquet_and_arrow(tmp_path, stories):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"id": list(range(300)), "content": stories[:299] + [None]})
    pq.write_table(table, tmp_path / "s.parquet", row_group_size=64)
    stats = {}
    got = [d for src in expand([tmp_path / "s.parquet"]) for d in documents(src, "content", stats=stats)]
    assert got == stories[:299] and stats["null_records"] == 1
    with pytest.raises(FlopwiseError, match=r"s.parquet has no column 'text' \(its columns: id, content\): "
                                            "give --text-field"):
        _docs(tmp_path / "s.parquet")
    with pytest.raises(FlopwiseError, match=r"column 'id' holds int64, not text"):
        _docs(tmp_path / "s.parquet", text_field="id")
    # a folder written by datasets.save_to_disk: Arrow IPC streams listed by state.json
    saved = tmp_path / "saved"
    saved.mkdir()
    for k in range(2):
        with pa.ipc.new_stream(saved / f"data-0000{k}-of-00002.arrow", table.schema) as w:
            w.write_table(table.slice(150 * k, 150))
    (saved / "state.json").write_text(json.dumps({"_data_files": [{"filename": f"data-0000{k}-of-00002.arrow"}
                                                                  for k in range(2)]}))
    (saved / "dataset_info.json").write_text("{}")
    assert _docs(saved, text_field="content") == stories[:299]
    # a DatasetDict: its train split
    ddict = tmp_path / "ddict"
    ddict.mkdir()
    saved.rename(ddict / "train")
    (ddict / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
    notes = []
    assert [d for src in expand([ddict], notes.append) for d in documents(src, "content")] == stories[:299]
    assert "--val" in notes[0] and "validation" in notes[0]
    # a folder holding saved datasets among other files: their Arrow files in their place, not their metadata
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    ddict.rename(mixed / "b-dict")
    (mixed / "a.txt").write_text(stories[299])
    (mixed / "c" / "state.json").parent.mkdir()
    (mixed / "c" / "state.json").write_text('{"step": 3}')  # some other program's state: read as a record
    with pytest.raises(FlopwiseError, match=r"state.json: record 0 \(line 1\) has no 'content' field"):
        _docs(mixed, text_field="content")
    (mixed / "c" / "state.json").unlink()
    (mixed / "c" / "more.jsonl").write_text(json.dumps({"content": stories[300]}) + "\n")
    sources = expand([mixed], lambda m: None)
    assert [s.path.name for s in sources] == ["a.txt", "data-00000-of-00002.arrow", "data-00001-of-00002.arrow",
                                              "more.jsonl"]
    (mixed / "b-dict" / "dataset_dict.json").write_text('{"splits": []}')
    with pytest.raises(FlopwiseError, match="dataset_dict.json cannot be read or lists no splits"):
        expand([mixed])


def test_prepare_reads_a_mixed_folder_and_keys_the_cache_by_field(tmp_path, stories):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder = tmp_path / "mixed"
    (folder / "deep").mkdir(parents=True)
    (folder / "a.txt").write_text(stories[0])
    with gzip.open(folder / "deep" / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": s}) + "\n" for s in stories[1:300])
    pq.write_table(pa.table({"text": stories[300:]}), folder / "c.parquet")
    (folder / ".hidden.txt").write_text("not read")
    (folder / "notes.bin").write_bytes(b"\0\1")  # an unknown kind inside a folder is left alone
    c = prepare([folder], out=tmp_path / "p", vocab_size=512)
    assert c.meta["n_docs_train"] + c.meta["n_docs_val"] == len(stories)
    assert [s.split("/")[-1] for s in c.meta["sources"]] == ["a.txt", "c.parquet", "b.jsonl.gz"]  # deep/ after c
    train = np.asarray(c.tokens("train"))
    assert int((train == 2).sum()) == c.meta["n_docs_train"]
    assert c.tokenizer().decode(train[: int(np.argmax(train == 2))].tolist()) in stories
    # the same file read through another field is another corpus: its own hash, not the cached one
    both = tmp_path / "both.jsonl"
    both.write_text("".join(json.dumps({"text": s, "alt": s.upper()}) + "\n" for s in stories[:300]))
    first, second = (prepare([both], out=tmp_path / f, vocab_size=400, text_field=f) for f in ("text", "alt"))
    assert first.meta["hash"] != second.meta["hash"] and second.meta["text_field"] == "alt"


def test_records_all_null_or_a_missing_tokenizer_say_so(tmp_path):
    nulls = tmp_path / "n.jsonl"
    nulls.write_text('{"text": null}\n' * 5)
    with pytest.raises(FlopwiseError, match=r"holds no text: all 5 of its records have a null 'text': check "
                                            "--text-field"):
        prepare([nulls], out=tmp_path / "p")
    with pytest.raises(FlopwiseError, match=r"--tokenizer .*nope.model does not exist"):
        prepare([nulls], out=tmp_path / "p", tokenizer=tmp_path / "nope.model")
    assert not (tmp_path / "p").exists()


def test_tokenizer_sample_is_bounded_and_seeded(tmp_path, stories):
    src = tmp_path / "s.txt"
    src.write_text("\n<|endoftext|>\n".join(stories))
    small = prepare([src], out=tmp_path / "a", vocab_size=400, tokenizer_sample_mb=0.1)
    sample = small.meta["tokenizer_sample"]
    assert sample["chars"] <= 0.1e6 and 0 < sample["documents"] < small.meta["n_docs_train"]
    again = prepare([src], out=tmp_path / "b", vocab_size=400, tokenizer_sample_mb=0.1)
    assert (small.path / "tokenizer.model").read_bytes() == (again.path / "tokenizer.model").read_bytes()
    whole = prepare([src], out=tmp_path / "c", vocab_size=400)
    assert whole.meta["tokenizer_sample"]["documents"] == whole.meta["n_docs_train"]  # all of it fits
    assert whole.meta["hash"] != small.meta["hash"]


def test_reusing_a_tokenizer(tmp_path, stories, bundled):
    src = tmp_path / "s.txt"
    src.write_text("\n<|endoftext|>\n".join(stories))
    reused = prepare([src], out=tmp_path / "r", tokenizer=bundled.tokenizer_path)
    assert reused.meta["vocab_size"] == 1024 and reused.meta["tokenizer"].endswith("tokenizer.model")
    assert (reused.path / "tokenizer.model").read_bytes() == bundled.tokenizer_path.read_bytes()
    sp = reused.tokenizer()
    train = np.asarray(reused.tokens("train"))
    first = train[1: int(np.argmax(train == 2))].tolist()
    assert sp.decode(first) in stories and sp.encode(sp.decode(first)) == first
    with pytest.raises(FlopwiseError, match="--vocab-size 2048 differs from --tokenizer's 1024 tokens"):
        prepare([src], out=tmp_path / "x", tokenizer=bundled.tokenizer_path, vocab_size=2048)
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(FlopwiseError, match="is not a SentencePiece model"):
        prepare([src], out=tmp_path / "y", tokenizer=tmp_path / "junk.model")
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(stories), model_writer=model, model_type="unigram",
                                   vocab_size=300, minloglevel=2)
    (tmp_path / "uni.model").write_bytes(model.getvalue())
    assert sentencepiece_model_type(model.getvalue()) == "unigram"
    assert sentencepiece_model_type(bundled.tokenizer_path.read_bytes()) == "bpe"
    with pytest.raises(FlopwiseError, match="is a unigram model"):
        prepare([src], out=tmp_path / "z", tokenizer=tmp_path / "uni.model")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_source_kinds():
    from pathlib import Path

    assert source_of(Path("a.JSONL.GZ")).kind == "json" and source_of(Path("a.JSONL.GZ")).compression == ".gz"
    assert source_of(Path("notes")).kind == "text" and source_of(Path("x.csv.zst")).kind == "text"
    with pytest.raises(FlopwiseError, match="compressed parquet file cannot be streamed"):
        source_of(Path("x.parquet.gz"))
