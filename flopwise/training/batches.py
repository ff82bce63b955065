"""Training data as a pure function of (seed, step): pre-training windows and instruction rows.

Each epoch visits its items (windows of seq_len + 1 tokens, or encoded examples) in a seeded
permutation. Because the batch of a step depends only on the seed and the step, a resumed run
sees exactly the data the uninterrupted run would have, and a DDP rank takes its slice of the
same global batch as a single process.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flopwise.config import TrainConfig
from flopwise.data.prepare import open_corpus
from flopwise.data.tokenizer import load_tokenizer, token_byte_lengths
from flopwise.errors import FlopwiseError
from flopwise.model.llama import ModelConfig
from flopwise.run import INSTRUCTIONS_FILE, is_tuning


class Shuffle:
    """Item indices of the global batch of a step: stream position i = step * global_batch + j is item
    perm_e[i mod n] of epoch e = i // n, perm_e a permutation seeded by (seed, e). ``offset_range`` > 1
    also draws one offset per epoch from the same generator (pre-training windows move their edges)."""

    def __init__(self, n_items: int, global_batch: int, seed: int, offset_range: int = 1):
        self.n, self.global_batch, self.seed, self.offset_range = n_items, global_batch, seed, offset_range
        self._epoch, self._perm, self._offset = -1, None, 0
        self._step, self._items = -1, None  # the last step's items, shared by its micro-batches

    def _order(self, epoch: int) -> tuple[np.ndarray, int]:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.n)
            self._offset = int(rng.integers(self.offset_range)) if self.offset_range > 1 else 0
            self._epoch = epoch
        return self._perm, self._offset

    def items(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(item index, epoch offset) of each sequence of the global batch of ``step``."""
        if step != self._step:
            i = np.arange(step * self.global_batch, (step + 1) * self.global_batch, dtype=np.int64)
            idx, off = np.empty_like(i), np.empty_like(i)
            epochs = i // self.n
            for epoch in range(int(epochs[0]), int(epochs[-1]) + 1):  # a step spans one epoch, or a few
                at = epochs == epoch
                perm, offset = self._order(epoch)
                idx[at], off[at] = perm[i[at] % self.n], offset
            self._step, self._items = step, (idx, off)
        return self._items


class Batches:
    """Non-overlapping windows of seq_len + 1 tokens of a token memmap, shifted by a per-epoch offset."""

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch: int, seed: int = 0):
        # a plain array over the same memory: np.memmap's indexing adds its own overhead to every gather
        self.tokens, self.seq_len = tokens.view(np.ndarray), seq_len
        self.n_windows = (len(tokens) - 1 - seq_len) // seq_len
        if self.n_windows < 1:
            raise FlopwiseError(f"the corpus has {len(tokens)} training tokens, fewer than two context windows of "
                                f"{seq_len}: give more text or a shorter --seq-len")
        self.shuffle = Shuffle(self.n_windows, global_batch, seed, offset_range=seq_len)

    def starts(self, step: int) -> np.ndarray:
        """Start offsets of the global batch of ``step``."""
        idx, offset = self.shuffle.items(step)
        return offset + idx * self.seq_len

    def get(self, step: int, lo: int, hi: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
        """Inputs and targets for sequences lo..hi of the global batch of ``step``."""
        starts = self.starts(step)[lo:hi]
        rows = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)].astype(np.int64)  # one gather
        return (torch.from_numpy(np.ascontiguousarray(rows[:, :-1])).to(device),
                torch.from_numpy(np.ascontiguousarray(rows[:, 1:])).to(device))


class InstructionBatches:
    """Encoded examples (rows of seq_len + 1 tokens) with their response masks, shuffled per epoch."""

    def __init__(self, tokens: np.ndarray, mask: np.ndarray, global_batch: int, seed: int):
        self.tokens, self.mask = tokens, mask
        self.shuffle = Shuffle(len(tokens), global_batch, seed)

    def get(self, step: int, lo: int, hi: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
        """Inputs, targets and the loss mask of sequences lo..hi of the global batch of ``step``."""
        idx = self.shuffle.items(step)[0][lo:hi]
        rows, mask = torch.from_numpy(self.tokens[idx]), torch.from_numpy(self.mask[idx])
        return rows[:, :-1].to(device), rows[:, 1:].to(device), mask.to(device)


def eval_windows(tokens: np.ndarray, seq_len: int, n_windows: int) -> np.ndarray:
    """The first ``n_windows`` non-overlapping windows of seq_len + 1 tokens (fixed, for comparable evals)."""
    n = min(n_windows, (len(tokens) - 1) // seq_len)
    if n < 1:
        raise FlopwiseError(f"the validation split has {len(tokens)} tokens, less than one context window of "
                            f"{seq_len}: give more validation text")
    return np.stack([np.asarray(tokens[i * seq_len:i * seq_len + seq_len + 1], dtype=np.int64) for i in range(n)])


@dataclass
class TrainingData:
    """What the training loop needs of a run's data."""

    batches: Batches | InstructionBatches
    val: tuple[np.ndarray, np.ndarray | None]  # windows of seq_len + 1 tokens, target masks or None
    val_final: tuple[np.ndarray, np.ndarray | None]
    byte_lengths: np.ndarray  # UTF-8 bytes of each token id (bits per byte)
    n_tokens_train: int


def training_data(run_dir: Path, config: dict, mc: ModelConfig, tc: TrainConfig, global_batch: int) -> TrainingData:
    """The data of a run as its config.json records it, checked against its fingerprint."""
    if is_tuning(config):
        return _instruction_data(run_dir, config, mc, tc, global_batch)
    corpus = open_corpus(config["data"]["path"])
    if corpus.meta["hash"] != config["data"]["hash"]:
        raise FlopwiseError(f"the prepared corpus at {corpus.path} changed since this run started: "
                            "re-prepare the original data or start a new run")
    val = corpus.tokens("val")
    return TrainingData(
        batches=Batches(corpus.tokens("train"), mc.seq_len, global_batch, tc.seed),
        val=(eval_windows(val, mc.seq_len, tc.eval_windows), None),
        val_final=(eval_windows(val, mc.seq_len, tc.final_eval_windows), None),
        byte_lengths=np.array(token_byte_lengths(corpus.tokenizer())), n_tokens_train=corpus.meta["n_tokens_train"])


def read_instructions(run_dir: Path, expected_hash: str | None = None) -> dict[str, np.ndarray]:
    """A tuning run's instructions.npz: train/heldout tokens (int64) and masks; checked against its hash."""
    path = run_dir / INSTRUCTIONS_FILE
    try:
        raw = path.read_bytes()
    except OSError:
        raise FlopwiseError(f"{path} is missing: this tuning run cannot resume; start it again") from None
    if expected_hash is not None and content_hash(raw) != expected_hash:
        raise FlopwiseError(f"{path} changed since this run started: start a new tuning run")
    return {k: v.astype(np.int64) if k.endswith("tokens") else v for k, v in np.load(io.BytesIO(raw)).items()}


def content_hash(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:16]


def _instruction_data(run_dir: Path, config: dict, mc: ModelConfig, tc: TrainConfig,
                      global_batch: int) -> TrainingData:
    d = read_instructions(run_dir, config["data"]["hash"])
    heldout = (d["heldout_tokens"], d["heldout_mask"])
    return TrainingData(
        batches=InstructionBatches(d["train_tokens"], d["train_mask"], global_batch, tc.seed),
        val=heldout, val_final=heldout,
        byte_lengths=np.array(token_byte_lengths(load_tokenizer(run_dir / "tokenizer.model"))),
        n_tokens_train=int(d["train_tokens"].shape[0] * mc.seq_len))
