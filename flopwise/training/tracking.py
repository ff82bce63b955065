"""Experiment tracking: a run's metrics mirrored to TensorBoard or Weights & Biases.

metrics.jsonl stays the source of truth; a tracker receives the same records as they are written
(training loss, learning rate, tok/s, MFU, threads, and the validation loss when evaluated, against
the step) and, at the end, final.json. It is told the run's config.json at the start.

- ``tensorboard``: event files in RUN/tensorboard (``tensorboard --logdir RUN/tensorboard``), written by
  torch.utils.tensorboard. A resumed run purges the events after its checkpoint, so a kill -9 leaves no
  duplicate steps.
- ``wandb``: a W&B run whose id is kept in RUN/wandb-id, so a resumed run continues it. Offline (files
  in RUN/wandb, ``wandb sync`` uploads them) unless $WANDB_MODE says otherwise or $WANDB_API_KEY is set:
  a tracker must never stop a run to ask for a login.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from flopwise.config import check_tracker
from flopwise.errors import FlopwiseError

_SCALARS = ("loss", "val_loss", "lr", "tok_per_s", "mfu", "threads", "tokens", "flops")


class Tracker:
    """Receives metric records and the final result; the base class is --log-to none."""

    def log(self, record: dict) -> None:
        pass

    def finish(self, final: dict | None) -> None:
        pass


class TensorBoard(Tracker):
    def __init__(self, run_dir: Path, config: dict, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        folder = run_dir / "tensorboard"
        _after_existing_events(folder)
        # steps are counted done (1 after the first): what a resumed run redoes begins at start_step + 1
        self.writer = SummaryWriter(str(folder), purge_step=start_step + 1 if start_step else None)
        if not start_step:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log(self, record: dict) -> None:
        for key in _SCALARS:
            if record.get(key) is not None:
                self.writer.add_scalar(key, record[key], record["step"] + 1)
        self.writer.flush()

    def finish(self, final: dict | None) -> None:
        if final:
            step = int(final.get("steps", 0))
            for key in ("val_loss", "val_bpb", "tokens_per_s", "mfu", "wall_seconds"):
                if isinstance(final.get(key), (int, float)):
                    self.writer.add_scalar(f"final/{key}", final[key], step)
        self.writer.close()


def _after_existing_events(folder: Path) -> None:
    """Wait (at most a second) until a new event file's name sorts after the folder's others: readers take
    the files in name order, whose first field is the creation second, and a resumed run's purge only
    works when its file comes after the killed run's (within one second the names sort by process id)."""
    seconds = [int(f.name.split(".")[3]) for f in folder.glob("events.out.tfevents.*")
               if f.name.split(".")[3:4] and f.name.split(".")[3].isdigit()]
    if seconds:
        while time.time() < max(seconds) + 1:
            time.sleep(0.05)


class WandB(Tracker):
    def __init__(self, run_dir: Path, config: dict, start_step: int):
        import wandb

        id_file = run_dir / "wandb-id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "flopwise"), name=run_dir.name, id=run_id,
                              resume="allow", dir=str(run_dir), config=config, mode=mode)

    def log(self, record: dict) -> None:
        self.run.log({k: record[k] for k in _SCALARS if record.get(k) is not None}, step=record["step"] + 1)

    def finish(self, final: dict | None) -> None:
        if final:
            self.run.summary.update({k: v for k, v in final.items() if isinstance(v, (int, float, str, bool))})
        self.run.finish()


def open_tracker(kind: str, run_dir: Path, config: dict, start_step: int) -> Tracker:
    """The tracker --log-to names, started for a run at ``start_step`` (0: a new run)."""
    check_tracker(kind)
    try:
        if kind == "tensorboard":
            return TensorBoard(run_dir, config, start_step)
        if kind == "wandb":
            return WandB(run_dir, config, start_step)
    except Exception as e:  # a tracker's own failure (login, disk, service) must read as one line
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FlopwiseError(f"--log-to {kind} could not start ({why}): fix that, or train with --log-to none") from None
    return Tracker()
