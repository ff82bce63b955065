"""Instruction tuning: a base run + Alpaca/chat examples -> a run directory like any other.

A tuning run is an ordinary run (config.json, metrics.jsonl, ckpt/latest.pt, final.json,
tokenizer.model) whose data is ``instructions.npz`` inside it: the encoded train and held-out
examples with their response masks, written before config.json, so a resumed run reads exactly
the rows it started with. The trainer's loop, checkpoints, resume and progress do the rest;
``init_from`` names the base run (its weights, a fresh optimizer), ``lora_rank`` > 0 trains
adapters on the frozen model (merged back by ``load_model``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
from dataclasses import asdict
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from flopwise import __version__
from flopwise.data.instructions import Encoded, Example, encode_examples, load_instructions, record_to_example
from flopwise.data.tokenizer import EOS_ID, load_tokenizer, token_byte_lengths
from flopwise.errors import FlopwiseError
from flopwise.fsutil import atomic_write_text
from flopwise.model.llama import Llama, ModelConfig
from flopwise.train.trainer import CONFIG_VERSION, TrainConfig, TrainingData, read_run_config, resolve

DATA_FILE = "instructions.npz"


class InstructionBatches:
    """Rows of the training examples, a seeded permutation per epoch: a pure function of (seed, step)."""

    def __init__(self, tokens: np.ndarray, mask: np.ndarray, global_batch: int, seed: int):
        self.tokens, self.mask, self.global_batch, self.seed = tokens, mask, global_batch, seed
        self._epoch, self._perm = -1, None

    def rows(self, step: int) -> np.ndarray:
        n = len(self.tokens)
        out = np.empty(self.global_batch, dtype=np.int64)
        for j, i in enumerate(range(step * self.global_batch, (step + 1) * self.global_batch)):
            if i // n != self._epoch:
                self._epoch, self._perm = i // n, np.random.default_rng([self.seed, i // n]).permutation(n)
            out[j] = self._perm[i % n]
        return out

    def get(self, step: int, lo: int, hi: int, device="cpu"):
        idx = self.rows(step)[lo:hi]
        rows = torch.from_numpy(self.tokens[idx])
        mask = torch.from_numpy(self.mask[idx])
        return rows[:, :-1].to(device), rows[:, 1:].to(device), mask.to(device)


def instruction_training_data(run_dir: Path, config: dict, mc: ModelConfig) -> TrainingData:
    path = run_dir / DATA_FILE
    try:
        raw = path.read_bytes()
    except OSError:
        raise FlopwiseError(f"{path} is missing: this tuning run cannot resume; start it again") from None
    if hashlib.sha256(raw).hexdigest()[:16] != config["data"]["hash"]:
        raise FlopwiseError(f"{path} changed since this run started: start a new tuning run")
    d = {k: v.astype(np.int64) if k.endswith("tokens") else v for k, v in np.load(io.BytesIO(raw)).items()}
    sp = load_tokenizer(run_dir / "tokenizer.model")
    heldout = (d["heldout_tokens"], d["heldout_mask"])
    return TrainingData(
        batches=lambda global_batch, seed: InstructionBatches(d["train_tokens"], d["train_mask"], global_batch, seed),
        val=heldout, val_final=heldout, byte_lengths=np.array(token_byte_lengths(sp)),
        n_tokens_train=int(d["train_tokens"].shape[0] * mc.seq_len))


def split_heldout(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded held-out split of a user's examples (at least one, at most 500)."""
    if len(examples) < 2:
        raise FlopwiseError("one example cannot be split into train and held-out: give more, or --eval-data")
    k = min(500, max(1, round(fraction * len(examples))))
    order = random.Random(seed).sample(range(len(examples)), len(examples))
    held = set(order[:k])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def default_lr(base_config: dict, lora: bool) -> float:
    """Full tuning at a tenth of the base run's peak rate; LoRA adapters at the base rate itself."""
    base_lr = float(base_config["resolved"]["lr"])
    return base_lr if lora else base_lr / 10


def new_tune_run(out: str | Path, base_run: str | Path, data: str | Path | None = None,
                 eval_data: str | Path | None = None, lora_rank: int = 0, lora_alpha: float = 16.0,
                 lora_targets: list[str] | None = None, epochs: float = 3.0, max_steps: int | None = None,
                 lr: float | None = None, batch_size: int = 32, micro_batch: int = 16, seed: int = 0,
                 heldout_fraction: float = 0.05, log=print) -> Path:
    """Create a tuning run directory from ``base_run`` (nothing is written until the data is valid)."""
    out, base_run = Path(out), Path(base_run)
    if (out / "config.json").exists():
        raise FlopwiseError(f"{out} already holds a run: resume it with 'flopwise tune --out {out}' alone, or "
                            "choose another --out")
    if not (base_run / "config.json").exists():
        raise FlopwiseError(f"base run {base_run} does not exist (no config.json): give a trained run directory")
    mc, base_tc, base_config = read_run_config(base_run)
    if not (base_run / "ckpt" / "latest.pt").exists():
        raise FlopwiseError(f"base run {base_run} has no checkpoint yet: train it first")
    sp = load_tokenizer(base_run / "tokenizer.model")
    records: tuple[list[dict], list[dict]] | None = None
    if data is None:
        from flopwise.data.derive import bundled_instructions

        records = bundled_instructions(sp, mc.seq_len, seed)
        train_ex = [record_to_example(r, f"bundled record {i}") for i, r in enumerate(records[0])]
        held_ex = [record_to_example(r, f"bundled held-out record {i}") for i, r in enumerate(records[1])]
        if not train_ex or not held_ex:
            raise FlopwiseError(f"no bundled example fits a context of {mc.seq_len} tokens (the Alpaca prompt "
                                "alone takes about 40): tune a base trained with --seq-len 128 or more, or give --data")
        if len(train_ex) < 100:
            log(f"note: only {len(train_ex)} bundled examples fit a context of {mc.seq_len} tokens "
                "(the Alpaca prompt alone takes about 40): a base model with --seq-len 256 gets about 2,300")
    else:
        train_ex = load_instructions(data)
        if eval_data is not None:
            held_ex = load_instructions(eval_data)
        else:
            train_ex, held_ex = split_heldout(train_ex, heldout_fraction, seed)
    train_enc = encode_examples(sp, train_ex, mc.seq_len)
    held_enc = encode_examples(sp, held_ex, mc.seq_len)
    for name, enc in (("training", train_enc), ("held-out", held_enc)):
        if enc.prompts_truncated or enc.responses_truncated:
            log(f"note: {enc.prompts_truncated} {name} prompt(s) cut from the start and {enc.responses_truncated} "
                f"response(s) cut at the end to fit the context of {mc.seq_len} tokens")
    tokens_per_step = batch_size * mc.seq_len
    steps = max_steps if max_steps is not None else max(1, round(epochs * len(train_ex) / batch_size))
    if steps < 1:
        raise FlopwiseError(f"--max-steps must be at least 1, got {steps}")
    tc = TrainConfig(n_tokens=steps * tokens_per_step, lr=lr or default_lr(base_config, lora_rank > 0),
                     batch_tokens=tokens_per_step, micro_batch=min(micro_batch, batch_size), warmup_fraction=0.03,
                     weight_decay=0.0, seed=seed, init_from=str(base_run.resolve()), lora_rank=lora_rank,
                     lora_alpha=lora_alpha, precision=base_tc.precision, device=base_tc.device,
                     eval_windows=len(held_ex), final_eval_windows=len(held_ex),
                     extra={"tuned_from": str(base_run.resolve()), "lora_rank": lora_rank,
                            "train_examples": len(train_ex), "heldout_examples": len(held_ex)})
    if lora_targets is not None:
        from flopwise.model.lora import parse_targets

        tc.lora_targets = list(parse_targets(lora_targets))
    resolved = resolve(mc, tc)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, train_tokens=_narrow(train_enc.tokens), train_mask=train_enc.mask,
             heldout_tokens=_narrow(held_enc.tokens), heldout_mask=held_enc.mask)
    raw = buf.getvalue()
    tmp = out / f".{DATA_FILE}.{os.getpid()}.tmp"
    tmp.write_bytes(raw)
    os.replace(tmp, out / DATA_FILE)
    if records is not None:  # the derived set, readable and reusable with --data / eval --instructions
        from flopwise.data.instructions import write_jsonl

        write_jsonl(out / "instructions-train.jsonl", records[0])
        write_jsonl(out / "instructions-heldout.jsonl", records[1])
        shutil.copyfile(Path(str(resources.files("flopwise") / "assets" / "tinystories" / "INSTRUCTIONS.md")),
                        out / "INSTRUCTIONS.md")
    shutil.copyfile(base_run / "tokenizer.model", out / "tokenizer.model")
    config = {"version": CONFIG_VERSION, "flopwise_version": __version__, "model": mc.to_dict(),
              "train": asdict(tc), "resolved": resolved,
              "data": {"kind": "instructions", "file": DATA_FILE, "hash": hashlib.sha256(raw).hexdigest()[:16],
                       "source": str(Path(data).resolve()) if data else "bundled (derived from TinyStories)",
                       "n_train": len(train_ex), "n_heldout": len(held_ex),
                       "prompts_truncated": train_enc.prompts_truncated + held_enc.prompts_truncated,
                       "responses_truncated": train_enc.responses_truncated + held_enc.responses_truncated},
              "base_run": str(base_run.resolve()), "template": "alpaca"}
    atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")  # last: the run now exists
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
    from flopwise.data.derive import STOPWORDS, content_words

    text = " ".join(continuation.split()).lower()
    start = " ".join(opening.split()[:4]).lower()
    if len(text.split()) < 3 or "once upon a time" in text or text.startswith(start):
        return False
    words = set(re.findall(r"[a-z]+", text))
    first_words = {m.group(1) for m in re.finditer(r"(?:^|[.!?]\s+)\W*([A-Z][a-z]+)", opening)}
    names = {w.lower() for w in re.findall(r"\b[A-Z][a-z]+\b", opening)
             if w not in first_words or opening.count(w) > 1} - STOPWORDS
    return bool(names & words) if names else bool(set(content_words(opening)) & words)


@torch.no_grad()
def generate_response(model: Llama, sp, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None,
                      generator: torch.Generator) -> str:
    """The model's response to an Alpaca prompt (stops at eos or at a new '### ' header)."""
    ids = [1] + sp.encode(prompt)
    room = model.config.seq_len - len(ids)
    if room < 1:
        ids, room = [1] + ids[len(ids) - model.config.seq_len + 9:], 8
    out = model.generate(torch.tensor([ids]), min(max_new_tokens, room), temperature, top_k, EOS_ID, generator)
    new = [t for t in out[0, len(ids):].tolist() if t != EOS_ID]
    return sp.decode(new).split("###")[0].strip()


def behaviour(model: Llama, sp, records: list[dict], max_per_task: int = 100, temperature: float = 0.8,
              top_k: int | None = 40, seed: int = 0, max_new_tokens: int = 256) -> dict:
    """Words-included rate and continuation rate on records that carry a ``task`` (the bundled set)."""
    from flopwise.data.instructions import render_prompt

    gen = torch.Generator().manual_seed(seed)
    words = [r for r in records if r.get("task") == "words" and r.get("words")][:max_per_task]
    cont = [r for r in records if r.get("task") == "continue" and r.get("input")][:max_per_task]
    result: dict = {"seed": seed, "temperature": temperature, "top_k": top_k}
    samples = []
    if words:
        hits, found = 0, 0
        for r in words:
            text = generate_response(model, sp, render_prompt(r["instruction"]), max_new_tokens, temperature, top_k,
                                     gen)
            hits += _words_present(text, r["words"])
            found += sum(_words_present(text, [w]) for w in r["words"])
            samples.append({"task": "words", "instruction": r["instruction"], "response": text})
        result.update(words_included=hits / len(words), words_n=len(words),
                      word_rate=found / sum(len(r["words"]) for r in words))
    if cont:
        ok = 0
        for r in cont:
            text = generate_response(model, sp, render_prompt(r["instruction"], r["input"]), max_new_tokens,
                                     temperature, top_k, gen)
            ok += continuation_ok(r["input"], text)
            samples.append({"task": "continue", "input": r["input"], "response": text})
        result.update(continuation_ok=ok / len(cont), continuation_n=len(cont))
    result["samples"] = samples[:3] + [s for s in samples if s["task"] == "continue"][:2]
    return result


def read_records(path: str | Path) -> list[dict]:
    """Raw records (for behaviour metadata) of an instruction file; load_instructions validates them."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def evaluate_instructions(model: Llama, sp, path: str | Path, behaviour_per_task: int = 100, seed: int = 0,
                          temperature: float = 0.8, top_k: int | None = 40) -> dict:
    """Held-out response loss (nats/token) and, where records carry tasks, behavioural scores."""
    from flopwise.train.trainer import evaluate

    examples = load_instructions(path)
    enc: Encoded = encode_examples(sp, examples, model.config.seq_len)
    device = next(model.parameters()).device
    loss, _ = evaluate(model, enc.tokens, 16, "fp32", device, masks=enc.mask)
    out = {"response_loss": loss, "examples": len(examples), "response_tokens": int(enc.mask.sum()),
           "prompts_truncated": enc.prompts_truncated, "responses_truncated": enc.responses_truncated}
    if behaviour_per_task > 0:
        out.update(behaviour(model, sp, read_records(path), behaviour_per_task, temperature, top_k, seed))
    return out


def tune_report(model: Llama, run_dir: str | Path, behaviour_per_task: int = 100, seed: int = 0) -> dict:
    """Held-out response loss of ``model`` on a tuning run's data, plus behaviour on the bundled set."""
    from flopwise.train.trainer import evaluate

    run_dir = Path(run_dir)
    d = np.load(run_dir / DATA_FILE)
    device = next(model.parameters()).device
    loss, _ = evaluate(model, d["heldout_tokens"].astype(np.int64), 16, "fp32", device, masks=d["heldout_mask"])
    out = {"response_loss": loss, "examples": int(len(d["heldout_mask"]))}
    held = run_dir / "instructions-heldout.jsonl"
    if behaviour_per_task > 0 and held.exists():
        sp = load_tokenizer(run_dir / "tokenizer.model")
        out.update(behaviour(model, sp, read_records(held), behaviour_per_task, seed=seed))
    return out
