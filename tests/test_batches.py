"""The order a run reads its training windows in: a resume and a WSD branch depend on it being a pure function of
(seed, step)."""
import numpy as np

from flopwise.training.batches import Batches, Shuffle


def _items_one_by_one(n: int, global_batch: int, seed: int, offset_range: int, step: int):
    """The definition, item by item: item i of the run is position i mod n of epoch i // n's permutation."""
    idx, off = [], []
    for i in range(step * global_batch, (step + 1) * global_batch):
        rng = np.random.default_rng([seed, i // n])
        perm = rng.permutation(n)
        offset = int(rng.integers(offset_range)) if offset_range > 1 else 0
        idx.append(perm[i % n])
        off.append(offset)
    return idx, off


def test_a_step_takes_its_items_in_order_across_epoch_boundaries():
    # batches larger than an epoch, equal to it, and steps that straddle one; steps asked for out of order
    for n, batch, offsets in [(10, 3, 1), (7, 7, 5), (5, 12, 3), (100, 18, 128)]:
        shuffle = Shuffle(n, batch, seed=4, offset_range=offsets)
        for step in [0, 1, 2, 3, 7, 40, 3, 1000]:
            idx, off = shuffle.items(step)
            assert (idx.tolist(), off.tolist()) == _items_one_by_one(n, batch, 4, offsets, step)


def test_a_step_is_one_gather_of_whole_windows(tmp_path):
    np.arange(1000, dtype=np.uint16).tofile(tmp_path / "tokens.bin")
    tokens = np.memmap(tmp_path / "tokens.bin", dtype=np.uint16, mode="r")  # as the trainer opens a corpus
    batches = Batches(tokens, seq_len=8, global_batch=6, seed=1)
    x, y = batches.get(5, 0, 6)
    starts = batches.starts(5)
    assert str(x.dtype) == str(y.dtype) == "torch.int64" and x.is_contiguous() and y.is_contiguous()
    assert x.tolist() == [list(range(s, s + 8)) for s in starts]
    assert y.tolist() == [list(range(s + 1, s + 9)) for s in starts]
    # a micro-batch is a slice of the step's gather: the same rows as fetching it alone
    assert batches.get(5, 2, 4)[0].tolist() == x[2:4].tolist()
