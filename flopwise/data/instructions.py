"""Instruction data: Alpaca and chat records -> prompt/response turns -> masked token rows.

Formats read (``load_instructions``):

- Alpaca JSON (a list) or JSONL: ``{"instruction": ..., "input": ... (optional), "output": ...}``;
  extra fields are kept as metadata (the bundled set uses ``task`` and ``words`` for its
  behavioural evaluation).
- Chat JSONL: ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``.

Every example is rendered with the Alpaca prompt template (Taori et al., 2023, Stanford Alpaca),
a chat as one Alpaca turn per user message. Encoded, a turn is ``enc(prompt) enc(response) [eos]``
after one leading ``[bos]``; only response tokens and their ``[eos]`` carry loss.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flopwise.data.tokenizer import BOS_ID, EOS_ID
from flopwise.errors import FlopwiseError
from flopwise.fsutil import atomic_write_text, parse_records

PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                  "context. Write a response that appropriately completes the request.")
STOP_STRINGS = ("### Instruction:", "### Response:")


def render_prompt(instruction: str, input: str = "", system: str | None = None) -> str:
    """The Alpaca prompt: preamble, instruction, optional input, then the response header."""
    if input:
        return (f"{system or PREAMBLE_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
                "### Response:\n")
    return f"{system or PREAMBLE}\n\n### Instruction:\n{instruction}\n\n### Response:\n"


def render_turn(instruction: str) -> str:
    """A later turn of a chat (no preamble)."""
    return f"\n\n### Instruction:\n{instruction}\n\n### Response:\n"


@dataclass
class Example:
    """One record: (prompt, response) turns; the loss falls on the responses only."""

    turns: list[tuple[str, str]]
    meta: dict = field(default_factory=dict)


def _text_field(rec: dict, name: str, where: str, required: bool) -> str:
    value = rec.get(name)
    if value is None:
        if required:
            raise FlopwiseError(f"{where} has no '{name}' field: every Alpaca record needs 'instruction' and 'output'")
        return ""
    if not isinstance(value, str):
        raise FlopwiseError(f"{where}: '{name}' must be a string, not {type(value).__name__}")
    return value


def record_to_example(rec, where: str) -> Example:
    """An Alpaca or chat record -> Example; ``where`` names the record in errors."""
    if not isinstance(rec, dict):
        raise FlopwiseError(f"{where} is a {type(rec).__name__}, not an object with 'instruction' and 'output'")
    if "messages" in rec:
        return _chat_example(rec["messages"], where)
    instruction = _text_field(rec, "instruction", where, True)
    output = _text_field(rec, "output", where, True)
    if not instruction.strip():
        raise FlopwiseError(f"{where} has an empty 'instruction'")
    if not output.strip():
        raise FlopwiseError(f"{where} has an empty 'output': remove the record or give it a response")
    meta = {k: v for k, v in rec.items() if k not in ("instruction", "input", "output")}
    return Example([(render_prompt(instruction, _text_field(rec, "input", where, False)), output)], meta)


def chat_turns(messages, where: str) -> tuple[list[tuple[str, str]], str | None, str | None]:
    """A chat's (prompt, reply) turns in the Alpaca template, the prompt of a trailing user message (None when
    the chat ends with a reply), and the system text; errors name the message."""
    if not isinstance(messages, list) or not messages:
        raise FlopwiseError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    system, turns, pending = None, [], None
    for j, m in enumerate(messages):
        here = f"{where}, message {j}"
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise FlopwiseError(f"{here} needs a string 'content'")
        role = m.get("role")
        if role == "system" and j == 0:
            system = m["content"]
        elif role == "user":
            if pending is not None:
                raise FlopwiseError(f"{here}: two user messages in a row; an assistant reply must come between")
            pending = m["content"]
        elif role == "assistant":
            if pending is None:
                raise FlopwiseError(f"{here}: an assistant message without a user message before it")
            turns.append((render_prompt(pending, system=system) if not turns else render_turn(pending), m["content"]))
            pending = None
        else:
            raise FlopwiseError(f"{here}: role {role!r} is not user, assistant or (first) system")
    trailing = None if pending is None else render_prompt(pending, system=system) if not turns else render_turn(pending)
    return turns, trailing, system


def chat_prompt_ids(sp, messages: list[dict]) -> list[int]:
    """The ids a tuned model continues for a chat ending in a user message, encoded as flopwise tunes:
    [bos], each earlier turn's prompt and reply (ending in eos), then the last prompt."""
    turns, trailing, _ = chat_turns(messages, "chat")
    if trailing is None:
        raise FlopwiseError("the last message must be the user's")
    ids = [BOS_ID]
    for prompt, reply in turns:
        ids += sp.encode(prompt) + sp.encode(reply) + [EOS_ID]
    return ids + sp.encode(trailing)


def _chat_example(messages, where: str) -> Example:
    turns, _, system = chat_turns(messages, where)
    if not turns:
        raise FlopwiseError(f"{where} has no assistant message to learn from")
    empty = [k for k, (_, reply) in enumerate(turns) if not reply.strip()]
    if empty:
        raise FlopwiseError(f"{where}: reply {empty[0]} has empty 'content'")
    return Example(turns, {k: v for k, v in {"system": system}.items() if v})


def load_instructions(path: str | Path) -> list[Example]:
    """Examples of an Alpaca JSON/JSONL or chat JSONL file, with errors that name the record."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FlopwiseError(f"instruction file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FlopwiseError(f"cannot read instruction file {path}: {e}") from None
    examples = [record_to_example(r, f"{path}: {where}") for where, r in parse_records(text, str(path))]
    if not examples:
        raise FlopwiseError(f"{path} holds no instruction records")
    return examples


def read_records(path: str | Path) -> list[dict]:
    """The raw records of an instruction file (for metadata such as the bundled set's ``task``)."""
    return [r for _, r in parse_records(Path(path).read_text(encoding="utf-8"), str(path))]


def write_jsonl(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


@dataclass
class Encoded:
    """Rows of ``seq_len + 1`` tokens (inputs are ``[:-1]``, targets ``[1:]``) and target masks."""

    tokens: np.ndarray  # (n, seq_len + 1) int64, padded with eos
    mask: np.ndarray  # (n, seq_len) uint8: 1 where the target is a response token (or its eos)
    prompts_truncated: int = 0
    responses_truncated: int = 0


MIN_PROMPT_TOKENS = 8  # a prompt is cut to no fewer tokens than this before a response is cut


def encode_example(sp, ex: Example, seq_len: int) -> tuple[list[int], list[int], bool, bool]:
    """(tokens, per-token loss flags, prompt truncated, response truncated) for one example.

    Too long for ``seq_len + 1`` tokens: earlier turns go first, then the prompt loses tokens from
    its start (its end, '### Response:', stays), and only then is the response cut at its end.
    """
    parts = [(sp.encode(p), sp.encode(r) + [EOS_ID]) for p, r in ex.turns]
    room = seq_len + 1 - 1  # after bos
    prompt_cut = response_cut = False
    while len(parts) > 1 and sum(len(p) + len(r) for p, r in parts) > room:
        parts.pop(0)
        prompt_cut = True
    p, r = parts[0]
    over = len(p) + len(r) + sum(len(a) + len(b) for a, b in parts[1:]) - room
    if over > 0:
        keep = max(min(len(p), MIN_PROMPT_TOKENS), len(p) - over)
        prompt_cut = keep < len(p)
        parts[0] = (p[len(p) - keep:], r)
        over -= len(p) - keep
    if over > 0:  # a single turn whose response does not fit even behind a minimal prompt
        p, r = parts[-1]
        parts[-1] = (p, r[:len(r) - over])
        response_cut = True
    tokens, flags = [BOS_ID], [0]
    for p, r in parts:
        tokens += p + r
        flags += [0] * len(p) + [1] * len(r)
    return tokens, flags, prompt_cut, response_cut


def encode_examples(sp, examples: list[Example], seq_len: int) -> Encoded:
    """Pad every example to one row; the mask marks response targets."""
    n = len(examples)
    tokens = np.full((n, seq_len + 1), EOS_ID, dtype=np.int64)
    mask = np.zeros((n, seq_len), dtype=np.uint8)
    cut_p = cut_r = 0
    for i, ex in enumerate(examples):
        t, f, pc, rc = encode_example(sp, ex, seq_len)
        tokens[i, :len(t)] = t
        mask[i, :len(t) - 1] = f[1:]  # target j is token j + 1
        cut_p += pc
        cut_r += rc
    return Encoded(tokens, mask, cut_p, cut_r)
