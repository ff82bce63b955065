"""Corpus preparation speed and memory: the streaming `prepare` against the whole-in-memory one it replaced.

    python benchmarks/prepare_speed.py [--sizes-mb 64 1024] [--baseline-mb 64] [--vocab-size 4096]

Generates text corpora of the given sizes in a temporary folder (stories recombined from the bundled
sample's sentences, one word in fifty replaced by a made-up one so the vocabulary keeps growing as
real text's does; nothing is committed), prepares each in a fresh process and prints MB/s and peak
resident memory. The baseline is the previous algorithm, kept here verbatim in spirit: read every file
whole, keep every document as a string, train the tokenizer on all of it, encode in one call. It runs
at the sizes up to --baseline-mb only (at 1 GB it would need ~15 GB of memory).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from flopwise.data.prepare import bundled_corpus


def make_corpus(path: Path, mb: float, seed: int = 0) -> None:
    train, _ = bundled_corpus()
    sentences = re.split(r"(?<=[.!?])\s+", train.read_text().replace("<|endoftext|>", " "))
    sentences = np.array([s for s in sentences if s.strip()], dtype=object)
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    written = 0
    with open(path, "w") as f:
        while written < mb * 1e6:
            stories = []
            for _ in range(2000):
                words = " ".join(sentences[rng.integers(0, len(sentences), rng.integers(4, 14))]).split(" ")
                for i in rng.integers(0, len(words), max(1, len(words) // 50)):
                    words[i] = "".join(letters[rng.integers(0, 26, rng.integers(3, 10))])
                stories.append(" ".join(words))
            block = "\n<|endoftext|>\n".join(stories) + "\n<|endoftext|>\n"
            f.write(block)
            written += len(block.encode())


# what each child process runs: one preparation, then its time and peak memory as JSON
CHILD = r"""
import json, resource, sys, time
from pathlib import Path
path, out, vocab, which = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
start = time.perf_counter()
if which == "streaming":
    from flopwise.data.prepare import prepare
    prepare([path], out=out, vocab_size=vocab, quiet=True, log=lambda m: None)
else:  # the previous prepare: everything in memory, the tokenizer trained on all of it
    import numpy as np
    from flopwise.data.sources import split_documents
    from flopwise.data.tokenizer import BOS_ID, EOS_ID, load_tokenizer, train_tokenizer

    def encode_documents(sp, docs, dtype):  # the previous prepare's, as it was
        ids = sp.encode(docs)
        out = np.empty(sum(len(x) + 2 for x in ids), dtype=dtype)
        pos = 0
        for x in ids:
            out[pos] = BOS_ID
            out[pos + 1:pos + 1 + len(x)] = x
            out[pos + 1 + len(x)] = EOS_ID
            pos += len(x) + 2
        return out

    docs = split_documents(Path(path).read_bytes().decode("utf-8", errors="replace"))
    order = np.random.default_rng(0).permutation(len(docs))
    held = set(order[: max(1, round(len(docs) * 0.05))].tolist())
    val = [d for i, d in enumerate(docs) if i in held]
    docs = [d for i, d in enumerate(docs) if i not in held]
    out.mkdir(parents=True)
    train_tokenizer(docs, vocab, out / "tokenizer.model", 0)
    sp = load_tokenizer(out / "tokenizer.model")
    encode_documents(sp, docs, np.uint16).tofile(out / "tokens-train.bin")
    encode_documents(sp, val, np.uint16).tofile(out / "tokens-val.bin")
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(which: str, corpus: Path, out: Path, vocab: int) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(corpus), str(out), str(vocab), which],
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{which} preparation failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[64, 1024])
    ap.add_argument("--baseline-mb", type=float, default=64, help="largest size the in-memory baseline runs at")
    ap.add_argument("--vocab-size", type=int, default=4096)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mb in args.sizes_mb:
            corpus = Path(tmp) / f"corpus-{mb:g}mb.txt"
            start = time.perf_counter()
            make_corpus(corpus, mb)
            size_mb = corpus.stat().st_size / 1e6
            print(f"generated {size_mb:,.0f} MB in {time.perf_counter() - start:.0f} s", flush=True)
            for which in ("baseline", "streaming"):
                if which == "baseline" and mb > args.baseline_mb:
                    continue
                r = run(which, corpus, Path(tmp) / f"{which}-{mb:g}", args.vocab_size)
                rows.append((which, size_mb, size_mb / r["seconds"], r["peak_rss_mb"], r["seconds"]))
                print(f"  {which:9s} {size_mb:8,.0f} MB  {size_mb / r['seconds']:6.2f} MB/s  peak RSS "
                      f"{r['peak_rss_mb']:6,.0f} MB  ({r['seconds']:.1f} s)", flush=True)
            corpus.unlink()
    print(f"\n{'prepare':10s} {'corpus MB':>10s} {'MB/s':>7s} {'peak RSS MB':>12s} {'RSS/corpus':>11s} "
          f"{'vs baseline':>12s}")
    base = {size: rate for which, size, rate, _, _ in rows if which == "baseline"}
    for which, size, rate, rss, _ in rows:
        ratio = f"{rate / base[size]:.2f}x" if size in base else "-"
        print(f"{which:10s} {size:10,.0f} {rate:7.2f} {rss:12,.0f} {rss / size:10.2f}x {ratio:>12s}")


if __name__ == "__main__":
    main()
