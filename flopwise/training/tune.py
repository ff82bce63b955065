"""Instruction tuning: a base run + Alpaca/chat examples -> a run directory like any other.

A tuning run is an ordinary run (config.json, metrics.jsonl, ckpt/latest.pt, final.json,
tokenizer.model) whose data is ``instructions.npz`` inside it: the encoded train and held-out
examples with their response masks, written before config.json, so a resumed run reads exactly
the rows it started with. The trainer's loop, checkpoints, resume and progress do the rest;
``init_weights`` names the base run (its weights, a fresh optimizer), ``lora_rank`` > 0 trains
adapters on the frozen model (merged back by ``load_model``).
"""

from __future__ import annotations

import io
import os
import random
import re
import shutil
from dataclasses import replace
from importlib import resources
from pathlib import Path

import numpy as np

from flopwise.config import TrainConfig, TuneOptions, resolve
from flopwise.data.derive import STOPWORDS, bundled_instructions, content_words
from flopwise.data.instructions import (
    Encoded,
    Example,
    encode_examples,
    load_instructions,
    read_records,
    record_to_example,
    render_prompt,
    write_jsonl,
)
from flopwise.data.tokenizer import BOS_ID, load_tokenizer
from flopwise.errors import FlopwiseError
from flopwise.infer.generate import Engine, Sampling
from flopwise.model.llama import Llama
from flopwise.model.lora import parse_targets
from flopwise.run import INSTRUCTIONS_FILE, check_new, latest_checkpoint, read_run_config, start_run_dir, write_config
from flopwise.training.batches import content_hash, read_instructions
from flopwise.training.trainer import evaluate

MAX_HELDOUT = 500  # examples split off a user's file for the held-out loss
WARMUP_FRACTION = 0.03  # of a tuning run's steps (Alpaca's recipe)
FEW_BUNDLED = 100  # fewer bundled examples than this fit the base's context: say why
EVAL_MICRO_BATCH = 16


def split_heldout(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded held-out split of a user's examples (at least one, at most MAX_HELDOUT)."""
    if len(examples) < 2:
        raise FlopwiseError("one example cannot be split into train and held-out: give more, or --eval-data")
    k = min(MAX_HELDOUT, max(1, round(fraction * len(examples))))
    order = random.Random(seed).sample(range(len(examples)), len(examples))
    held = set(order[:k])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def default_lr(base_config: dict, lora: bool) -> float:
    """Full tuning at a tenth of the base run's peak rate; LoRA adapters at the base rate itself."""
    base_lr = float(base_config["resolved"]["lr"])
    return base_lr if lora else base_lr / 10


def _examples(sp, seq_len: int, data, eval_data, opts: TuneOptions, log):
    """(train, held-out, bundled records or None): the user's files, or the set derived from the bundled corpus."""
    if data is not None:
        train_ex = load_instructions(data)
        if eval_data is not None:
            return train_ex, load_instructions(eval_data), None
        return (*split_heldout(train_ex, opts.heldout_fraction, opts.seed), None)
    records = bundled_instructions(sp, seq_len, opts.seed)
    train_ex = [record_to_example(r, f"bundled record {i}") for i, r in enumerate(records[0])]
    held_ex = [record_to_example(r, f"bundled held-out record {i}") for i, r in enumerate(records[1])]
    if not train_ex or not held_ex:
        raise FlopwiseError(f"no bundled example fits a context of {seq_len} tokens (the Alpaca prompt "
                            "alone takes about 40): tune a base trained with --seq-len 128 or more, or give --data")
    if len(train_ex) < FEW_BUNDLED:
        log(f"note: only {len(train_ex)} bundled examples fit a context of {seq_len} tokens "
            "(the Alpaca prompt alone takes about 40): a base model with --seq-len 256 gets about 2,300")
    return train_ex, held_ex, records


def new_tune_run(out: str | Path, base_run: str | Path, data: str | Path | None = None,
                 eval_data: str | Path | None = None, opts: TuneOptions | None = None, log=print) -> Path:
    """Create a tuning run directory from ``base_run`` (nothing is written until the data is valid)."""
    out, base_run, opts = Path(out), Path(base_run), opts or TuneOptions()
    if not base_run.exists():
        raise FlopwiseError(f"base run {base_run} does not exist: give a trained run directory")
    mc, base_tc, base_config = read_run_config(base_run)
    if not latest_checkpoint(base_run).exists():
        raise FlopwiseError(f"base run {base_run} has no checkpoint yet: train it first")
    if opts.max_steps is not None and opts.max_steps < 1:
        raise FlopwiseError(f"--max-steps must be at least 1, got {opts.max_steps}")
    sp = load_tokenizer(base_run / "tokenizer.model")
    train_ex, held_ex, records = _examples(sp, mc.seq_len, data, eval_data, opts, log)
    train_enc = encode_examples(sp, train_ex, mc.seq_len)
    held_enc = encode_examples(sp, held_ex, mc.seq_len)
    for name, enc in (("training", train_enc), ("held-out", held_enc)):
        if enc.prompts_truncated or enc.responses_truncated:
            log(f"note: {enc.prompts_truncated} {name} prompt(s) cut from the start and {enc.responses_truncated} "
                f"response(s) cut at the end to fit the context of {mc.seq_len} tokens")
    tokens_per_step = opts.batch_size * mc.seq_len
    steps = opts.max_steps or max(1, round(opts.epochs * len(train_ex) / opts.batch_size))
    base = str(base_run.resolve())
    tc = TrainConfig(n_tokens=steps * tokens_per_step, lr=opts.lr or default_lr(base_config, opts.lora_rank > 0),
                     batch_tokens=tokens_per_step, micro_batch=min(opts.micro_batch, opts.batch_size),
                     warmup_fraction=WARMUP_FRACTION, weight_decay=0.0, seed=opts.seed, init_weights=base,
                     optimizer="adamw",  # tuning keeps AdamW: Muon for fine-tuning was not measured
                     lora_rank=opts.lora_rank, lora_alpha=opts.lora_alpha, log_to=opts.log_to,
                     lora_targets=list(parse_targets(opts.lora_targets)), precision=base_tc.precision,
                     device=base_tc.device, eval_windows=len(held_ex), final_eval_windows=len(held_ex),
                     extra={"tuned_from": base, "lora_rank": opts.lora_rank, "train_examples": len(train_ex),
                            "heldout_examples": len(held_ex)})
    resolve(mc, tc)  # validates before anything is written
    check_new(out, f"'flopwise tune --out {out}' alone", log)
    start_run_dir(out)
    buf = io.BytesIO()
    np.savez(buf, train_tokens=_narrow(train_enc.tokens), train_mask=train_enc.mask,
             heldout_tokens=_narrow(held_enc.tokens), heldout_mask=held_enc.mask)
    raw = buf.getvalue()
    tmp = out / f".{INSTRUCTIONS_FILE}.{os.getpid()}.tmp"
    tmp.write_bytes(raw)
    os.replace(tmp, out / INSTRUCTIONS_FILE)
    if records is not None:  # the derived set, readable and reusable with --data / eval --instructions
        write_jsonl(out / "instructions-train.jsonl", records[0])
        write_jsonl(out / "instructions-heldout.jsonl", records[1])
        shutil.copyfile(Path(str(resources.files("flopwise") / "assets" / "tinystories" / "INSTRUCTIONS.md")),
                        out / "INSTRUCTIONS.md")
    shutil.copyfile(base_run / "tokenizer.model", out / "tokenizer.model")
    write_config(out, mc, tc, {"kind": "instructions", "file": INSTRUCTIONS_FILE, "hash": content_hash(raw),
                               "source": str(Path(data).resolve()) if data else "bundled (derived from TinyStories)",
                               "n_train": len(train_ex), "n_heldout": len(held_ex),
                               "prompts_truncated": train_enc.prompts_truncated + held_enc.prompts_truncated,
                               "responses_truncated": train_enc.responses_truncated + held_enc.responses_truncated},
                 base_run=base, template="alpaca")
    return out


def _narrow(tokens: np.ndarray) -> np.ndarray:
    return tokens.astype(np.uint16 if tokens.max(initial=0) < 65536 else np.int64)


# ---- evaluation: response loss and behaviour, no model judge ----

def _words_present(text: str, words: list[str]) -> bool:
    return all(re.search(rf"\b{re.escape(w)}\b", text, re.IGNORECASE) for w in words)


def continuation_ok(opening: str, continuation: str) -> bool:
    """A continuation carries the story on: it does not restart ('Once upon a time', or the opening
    again) and it stays with the story: it names one of the opening's characters, or, when the
    opening names none, reuses one of its content words."""
    text = " ".join(continuation.split()).lower()
    start = " ".join(opening.split()[:4]).lower()
    if len(text.split()) < 3 or "once upon a time" in text or text.startswith(start):
        return False
    words = set(re.findall(r"[a-z]+", text))
    first_words = {m.group(1) for m in re.finditer(r"(?:^|[.!?]\s+)\W*([A-Z][a-z]+)", opening)}
    names = {w.lower() for w in re.findall(r"\b[A-Z][a-z]+\b", opening)
             if w not in first_words or opening.count(w) > 1} - STOPWORDS
    return bool(names & words) if names else bool(set(content_words(opening)) & words)


def generate_response(engine: Engine, prompt: str, s: Sampling) -> str:
    """The model's response to an Alpaca prompt (stops at eos or at a new '### ' header); a prompt too long for
    the context keeps its end and leaves room for 8 new tokens."""
    ids = engine.encode_prompt(prompt)
    ctx = engine.config.seq_len
    if len(ids) > ctx - 1:
        ids = [BOS_ID] + ids[len(ids) - ctx + 9:]
    s = replace(s, max_new_tokens=min(s.max_new_tokens, ctx - len(ids)), stop=["###"])
    return "".join(engine.stream_text(ids, s)).strip()


def behaviour(model: Llama, sp, records: list[dict], max_per_task: int = 100, temperature: float = 0.8,
              top_k: int = 40, seed: int = 0, max_new_tokens: int = 256) -> dict:
    """Words-included rate and continuation rate on records that carry a ``task`` (the bundled set).
    Generation k is sampled with seed ``seed + k``."""
    engine = Engine(model, sp)
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k)
    words = [r for r in records if r.get("task") == "words" and r.get("words")][:max_per_task]
    cont = [r for r in records if r.get("task") == "continue" and r.get("input")][:max_per_task]
    result: dict = {"seed": seed, "temperature": temperature, "top_k": top_k, "asked_per_task": max_per_task}
    samples = []
    k = 0
    if words:
        hits, found = 0, 0
        for r in words:
            text = generate_response(engine, render_prompt(r["instruction"]), replace(sampling, seed=seed + k))
            k += 1
            hits += _words_present(text, r["words"])
            found += sum(_words_present(text, [w]) for w in r["words"])
            samples.append({"task": "words", "instruction": r["instruction"], "response": text})
        result.update(words_included=hits / len(words), words_n=len(words),
                      word_rate=found / sum(len(r["words"]) for r in words))
    if cont:
        ok = 0
        for r in cont:
            text = generate_response(engine, render_prompt(r["instruction"], r["input"]),
                                     replace(sampling, seed=seed + k))
            k += 1
            ok += continuation_ok(r["input"], text)
            samples.append({"task": "continue", "input": r["input"], "response": text})
        result.update(continuation_ok=ok / len(cont), continuation_n=len(cont))
    result["samples"] = samples[:3] + [s for s in samples if s["task"] == "continue"][:2]
    return result


def evaluate_instructions(model: Llama, sp, path: str | Path, behaviour_per_task: int = 100, seed: int = 0,
                          temperature: float = 0.8, top_k: int = 40) -> dict:
    """Held-out response loss (nats/token) and, where records carry tasks, behavioural scores."""
    examples = load_instructions(path)
    enc: Encoded = encode_examples(sp, examples, model.config.seq_len)
    loss = _response_loss(model, enc.tokens, enc.mask)
    out = {"response_loss": loss, "examples": len(examples), "response_tokens": int(enc.mask.sum()),
           "prompts_truncated": enc.prompts_truncated, "responses_truncated": enc.responses_truncated}
    if behaviour_per_task > 0:
        out.update(behaviour(model, sp, read_records(path), behaviour_per_task, temperature, top_k, seed))
    return out


def tune_report(model: Llama, run_dir: str | Path, behaviour_per_task: int = 100, seed: int = 0) -> dict:
    """Held-out response loss of ``model`` on a tuning run's data, plus behaviour on the bundled set."""
    run_dir = Path(run_dir)
    d = read_instructions(run_dir)
    out = {"response_loss": _response_loss(model, d["heldout_tokens"], d["heldout_mask"]),
           "examples": int(len(d["heldout_mask"]))}
    held = run_dir / "instructions-heldout.jsonl"
    if behaviour_per_task > 0 and held.exists():
        sp = load_tokenizer(run_dir / "tokenizer.model")
        out.update(behaviour(model, sp, read_records(held), behaviour_per_task, seed=seed))
    return out


def _response_loss(model: Llama, tokens: np.ndarray, mask: np.ndarray) -> float:
    return evaluate(model, tokens, EVAL_MICRO_BATCH, "fp32", next(model.parameters()).device, masks=mask)[0]
