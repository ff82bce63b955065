"""Training batches drawn from a token memmap, as a pure function of (seed, step).

Each epoch is a seeded permutation of non-overlapping windows of seq_len + 1 tokens (with a
per-epoch offset, so window edges move between epochs). Because the batch of a step depends
only on the seed and the step, a resumed run sees exactly the data the uninterrupted run
would have, and a DDP rank takes its slice of the same global batch as a single process.
"""

from __future__ import annotations

import numpy as np
import torch

from flopwise.errors import FlopwiseError


class Batches:
    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch: int, seed: int = 0):
        self.tokens, self.seq_len, self.global_batch, self.seed = tokens, seq_len, global_batch, seed
        self.n_windows = (len(tokens) - 1 - seq_len) // seq_len
        if self.n_windows < 1:
            raise FlopwiseError(f"the corpus has {len(tokens)} training tokens, fewer than two context windows of "
                                f"{seq_len}: give more text or a shorter --seq-len")
        self._epoch, self._perm, self._offset = -1, None, 0
        self._step, self._starts = -1, None  # the last step's starts, shared by its micro-batches

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, int]:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm, self._offset = rng.permutation(self.n_windows), int(rng.integers(self.seq_len))
            self._epoch = epoch
        return self._perm, self._offset

    def starts(self, step: int) -> np.ndarray:
        """Start offsets of the global batch of ``step``."""
        if step == self._step:
            return self._starts
        out = np.empty(self.global_batch, dtype=np.int64)
        for j, i in enumerate(range(step * self.global_batch, (step + 1) * self.global_batch)):
            perm, offset = self._epoch_order(i // self.n_windows)
            out[j] = offset + perm[i % self.n_windows] * self.seq_len
        self._step, self._starts = step, out
        return out

    def get(self, step: int, lo: int, hi: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets for sequences lo..hi of the global batch of ``step``."""
        starts = self.starts(step)[lo:hi]
        rows = np.stack([np.asarray(self.tokens[s:s + self.seq_len + 1], dtype=np.int64) for s in starts])
        rows = torch.from_numpy(rows)
        return rows[:, :-1].to(device), rows[:, 1:].to(device)


def eval_windows(tokens: np.ndarray, seq_len: int, n_windows: int) -> np.ndarray:
    """The first ``n_windows`` non-overlapping windows of seq_len + 1 tokens (fixed, for comparable evals)."""
    n = min(n_windows, (len(tokens) - 1) // seq_len)
    if n < 1:
        raise FlopwiseError(f"the validation split has {len(tokens)} tokens, less than one context window of "
                            f"{seq_len}: give more validation text")
    return np.stack([np.asarray(tokens[i * seq_len:i * seq_len + seq_len + 1], dtype=np.int64) for i in range(n)])
