"""The bundled instruction set, derived by code from the bundled TinyStories sample.

Three tasks, each answered by a story (or its rest) taken verbatim from the sample, so the set is
derived data under the sample's CDLA-Sharing-1.0 terms (see assets/tinystories/INSTRUCTIONS.md):

- ``words``: "Write a short story that uses the words X, Y and Z." (X, Y, Z from the story) -> the story
- ``continue``: "Continue this story." with the opening sentences as input -> the rest
- ``about``: "Write a story about <name>, who <predicate>." built from the story's own sentence -> the story

Stories are cut at sentence ends so that prompt and response fit a context of ``seq_len`` tokens.
Held-out examples come from the first paragraphs of valid.txt (text a base model trained on the
bundled corpus never saw); training examples from train.txt and the rest of valid.txt.
Deterministic given the seed.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable

from flopwise.data.instructions import render_prompt
from flopwise.data.prepare import bundled_corpus, split_documents

TASKS = ("words", "continue", "about")
_SENTENCE = re.compile(r"(?<=[.!?])[\"']?\s+(?=[A-Z\"'])")
_WORD = re.compile(r"[A-Za-z]+")
# common words that make a "uses the words" request trivial
STOPWORDS = frozenset("""a about after again all also always an and any are around as at away back be because
been before big but by came can could day did do does down each even every for from get go going good got had has
have he her here him his home how i if in into is it its just know like little look looked made make many may me
more mom much must my named new next no not now of off oh on once one only or other our out over played put ran
said saw say see she so some something soon still such than that the their them then there they thing things
this time to too took two up upon us very want wanted was way we went were what when where which while who why
will with would yes you your dad day felt fun happy help let lot lots play friend friends asked decided
liked loved heard come girl thought smiled laughed started tried found told knew gave looking playing""".split())


def split_sentences(text: str) -> list[str]:
    """Sentences, never splitting inside a quotation ('"Wow! Look," said Tom.' is one)."""
    out, acc = [], ""
    for part in _SENTENCE.split(" ".join(text.split())):
        acc = f"{acc} {part}" if acc else part
        if acc.count('"') % 2 == 0:
            out.append(acc.strip())
            acc = ""
    if acc.strip():
        out.append(acc.strip())
    return out


def _join_and(words: list[str]) -> str:
    return ", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else words[0]


def content_words(text: str) -> list[str]:
    """Lower-case words of 4+ letters that are not stopwords or names, in order of first use."""
    names = {w for w in _WORD.findall(text) if w[0].isupper()} - {w.capitalize() for w in _WORD.findall(text)
                                                                     if w.islower()}
    seen, out = set(), []
    for w in _WORD.findall(text):
        lw = w.lower()
        if len(lw) >= 4 and lw not in STOPWORDS and w not in names and lw not in seen:
            seen.add(lw)
            out.append(lw)
    return out


def _name_and_predicate(sentences: list[str]) -> tuple[str, str] | None:
    """A character's name and what a sentence of the story says they do ('Lily loved to paint.')."""
    text = " ".join(sentences)
    lower = {w.lower() for w in _WORD.findall(text) if w.islower()}
    counts = Counter(w for w in _WORD.findall(text) if w[0].isupper() and w.lower() not in lower
                     and w.lower() not in STOPWORDS and len(w) > 1)
    for name, n in counts.most_common(3):
        if n < 2:
            break
        for s in sentences:
            m = re.match(rf"{name} (\w+(?: \w+){{2,9}})[.!]$", s)
            if m and m.group(1).split()[0].islower():
                return name, m.group(1)
    return None


def derive_example(story: str, task: str, rng: random.Random, count: Callable[[str], int],
                   max_tokens: int) -> dict | None:
    """One Alpaca record (with ``task``, and ``words`` for the words task) or None if the story does not suit.

    ``count(text)`` is a text's token count; prompt plus response must not exceed ``max_tokens``.
    """
    sentences = split_sentences(story)
    if len(sentences) < 3:
        return None
    lengths = [count(s) for s in sentences]
    for end in range(len(sentences), 1, -1):  # the longest prefix of whole sentences that fits
        if sum(lengths[:end]) > max_tokens:  # cheap lower bound: skip without encoding
            continue
        state = rng.getstate()
        rec = _make(sentences[:end], task, rng)
        if rec is None:
            return None
        if count(render_prompt(rec["instruction"], rec.get("input", ""))) + count(rec["output"]) <= max_tokens:
            return rec
        rng.setstate(state)  # the same draws for a shorter cut
    return None


def _make(sentences: list[str], task: str, rng: random.Random) -> dict | None:
    story = " ".join(sentences)
    if task == "words":
        # the words come from the story's opening sentences, in their order: a story that uses them early
        # makes the link between instruction and response short enough for a small model to learn
        words = content_words(" ".join(sentences[:2]))
        if len(words) < 3:
            words = content_words(story)
        if len(words) < 3:
            return None
        picked = sorted(rng.sample(words, 3), key=words.index)
        return {"instruction": f"Write a short story that uses the words {_join_and(picked)}.", "output": story,
                "task": "words", "words": picked}
    if task == "continue":
        k = 1 if len(sentences) < 4 else 2
        return {"instruction": "Continue this story.", "input": " ".join(sentences[:k]),
                "output": " ".join(sentences[k:]), "task": "continue"}
    found = _name_and_predicate(sentences)
    if found is None:
        return None
    name, predicate = found
    return {"instruction": f"Write a story about {name}, who {predicate}.", "output": story, "task": "about"}


def derive_instructions(stories: list[str], seed: int, count: Callable[[str], int], max_tokens: int) -> list[dict]:
    """Records for the stories, tasks taken in turn (a story unsuited to its task tries the next)."""
    rng = random.Random(seed)
    out = []
    for i, story in enumerate(stories):
        for j in range(len(TASKS)):
            rec = derive_example(story, TASKS[(i + j) % len(TASKS)], rng, count, max_tokens)
            if rec is not None:
                out.append(rec)
                break
    return out


def bundled_instructions(sp, seq_len: int, seed: int = 0, max_heldout: int = 300) -> tuple[list[dict], list[dict]]:
    """(train, held-out) records from the bundled sample, sized to ``seq_len`` with tokenizer ``sp``."""
    def count(text: str) -> int:
        return len(sp.encode(text))

    room = seq_len - 1  # seq_len + 1 tokens per row, less bos and eos
    train_path, valid_path = bundled_corpus()
    train = derive_instructions(split_documents(train_path.read_text()), seed, count, room)
    unseen = derive_instructions(split_documents(valid_path.read_text()), seed + 1, count, room)
    # held out: the first stories of valid.txt; the rest of valid.txt trains too, because a base model has
    # often memorised train.txt, and on stories it has not seen, only following the instruction lowers the loss
    return train + unseen[max_heldout:], unseen[:max_heldout]
