"""The run directory: the one format every layer above reads and writes.

```
RUN/
  config.json       version, model shape, TrainConfig, the resolved step plan, the data's fingerprint (written last:
                    its presence means the run exists)
  instructions.npz  a tuning run's encoded examples (written before config.json)
  tokenizer.model   the SentencePiece model the run's tokens come from
  metrics.jsonl     one JSON object per logged step
  ckpt/latest.pt    model, optimizer, RNG and step, replaced atomically; ckpt/step-K.pt kept on request
  final.json        written last: a run with it is done, one without it resumes from ckpt/latest.pt
  .lock             held (flock) by the process training the run
```

Nothing here trains: the trainer, the inference engine, export, the sweep and the autopilot all
come here to read or create a run, so none of them imports another to do it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
from dataclasses import asdict
from pathlib import Path

import torch

from flopwise import __version__
from flopwise.config import TrainConfig, resolve
from flopwise.data.prepare import Corpus
from flopwise.errors import FlopwiseError
from flopwise.fsutil import atomic_write_text, check_output_dir, is_temp_sibling
from flopwise.laws.flops import n_params_total
from flopwise.laws.hardware import check_training_memory
from flopwise.model.llama import Llama, ModelConfig
from flopwise.model.lora import apply_lora, merge_lora

CONFIG_VERSION = 1
INSTRUCTIONS_FILE = "instructions.npz"  # a tuning run's data, inside the run


# ---- config.json ----

# A new run's set-up marks its folder first and unmarks it once config.json is written, so a set-up killed part-way
# (a tokenizer copied, config.json not yet there) is recognisably flopwise's and the next start may replace it. The
# mark names the process setting up, so a set-up still running is not taken for a killed one.
SETTING_UP = ".setting-up"
# all a marked folder without config.json may hold: what a set-up writes before it (and their temp siblings)
BEFORE_CONFIG = {"tokenizer.model", INSTRUCTIONS_FILE, "instructions-train.jsonl", "instructions-heldout.jsonl",
                 "INSTRUCTIONS.md", ".lock", SETTING_UP}
RUN_FILES = {"config.json", "metrics.jsonl", "ckpt", "final.json", "speed.json", "precision.txt", "tune_eval.json",
             *BEFORE_CONFIG}


def is_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a flopwise run: a config.json flopwise wrote (not merely a file of that name)."""
    try:
        config = json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("version") == CONFIG_VERSION and "model" in config \
        and "train" in config


def never_trained(run_dir: Path) -> bool:
    """A run folder left by a failed start (e.g. the first step ran out of memory, or the start was interrupted):
    a readable flopwise config.json, nothing but flopwise's own plain files (and their temp siblings) beside it,
    an empty ckpt/, no step logged, not finished, and nobody holding its lock. Or a set-up killed before its
    config.json: the mark of a process no longer running, beside only what a set-up writes first."""
    if not run_dir.is_dir() or run_dir.is_symlink():
        return False
    if is_run(run_dir):
        allowed, temps_of = RUN_FILES, RUN_FILES
    elif _killed_set_up(run_dir):
        allowed, temps_of = BEFORE_CONFIG, BEFORE_CONFIG | {"config.json"}
    elif any(is_temp_sibling(p.name, SETTING_UP) for p in run_dir.iterdir()):  # killed writing the mark itself
        allowed, temps_of = {".lock"}, {SETTING_UP}
    else:
        return False
    for p in run_dir.iterdir():
        if not (p.name in allowed or any(is_temp_sibling(p.name, f) for f in temps_of)) or p.is_symlink():
            return False
        if p.name == "ckpt" and not (p.is_dir() and not any(p.iterdir())):
            return False
        if p.name != "ckpt" and not p.is_file():
            return False
    return not (run_dir / "final.json").exists() and not read_metrics(run_dir, 1 << 62) and \
        not run_is_locked(run_dir)


def _killed_set_up(run_dir: Path) -> bool:
    """Whether ``run_dir`` carries the mark of a set-up whose process is gone (or ran on another host)."""
    try:
        mark = (run_dir / SETTING_UP).read_text().split()
    except (OSError, UnicodeDecodeError):
        return False
    if len(mark) != 6 or mark[:3] != ["flopwise", "set-up:", "pid"] or not mark[3].isdigit() or mark[4] != "on":
        return False
    if mark[5] != socket.gethostname():
        return True
    try:
        os.kill(int(mark[3]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        pass
    return False


def _mark_setting_up(run_dir: Path) -> None:
    atomic_write_text(run_dir / SETTING_UP, f"flopwise set-up: pid {os.getpid()} on {socket.gethostname()}\n")


def start_run_dir(run_dir: Path) -> None:
    """Make a new run's folder (check_new has allowed it) and mark it as being set up; write_config unmarks."""
    run_dir.mkdir(parents=True, exist_ok=True)
    _mark_setting_up(run_dir)


def check_new(run_dir: Path, resume_hint: str, log=print) -> None:
    """A new run may go into a new or empty folder, or replace a failed start; nothing else is touched."""
    if never_trained(run_dir):
        log(f"note: {run_dir} holds a run that never trained a step (a failed start): replacing it")
        with run_lock(run_dir):  # nobody starts or trains it while it is cleared
            # marked first and config.json last, so a kill part-way leaves a folder the next start replaces
            _mark_setting_up(run_dir)
            for p in run_dir.iterdir():
                if p.name not in (".lock", SETTING_UP, "config.json"):
                    p.rmdir() if p.name == "ckpt" else p.unlink()  # only plain files and an empty ckpt/
            (run_dir / "config.json").unlink(missing_ok=True)
        return
    if is_run(run_dir):
        raise FlopwiseError(f"{run_dir} already holds a run: resume it with {resume_hint}, or choose another --out")
    check_output_dir(run_dir, "--out", lambda p: False)


def write_config(run_dir: Path, model: ModelConfig, train: TrainConfig, data: dict, **extra) -> dict:
    """config.json, atomically; the last file of a new run's set-up, so its presence means the run exists."""
    config = {"version": CONFIG_VERSION, "flopwise_version": __version__, "model": model.to_dict(),
              "train": asdict(train), "resolved": resolve(model, train).to_dict(), "data": data, **extra}
    atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2) + "\n")
    (run_dir / SETTING_UP).unlink(missing_ok=True)
    return config


def new_run(run_dir: str | Path, model: ModelConfig, train: TrainConfig, corpus: Corpus, log=print) -> Path:
    """Create a pre-training run directory on a prepared corpus (nothing is written if the configs are invalid)."""
    run_dir = Path(run_dir)
    if model.vocab_size != corpus.vocab_size:
        raise FlopwiseError(f"the model's vocab_size {model.vocab_size} differs from the corpus' {corpus.vocab_size}")
    resolve(model, train)  # validates the options and the budget before anything is written
    require_device(train.device)
    gpu = train.device.startswith("cuda") or (train.device == "auto" and torch.cuda.is_available())
    check_training_memory(n_params_total(model.shape), "the model", "choose a smaller model",
                          torch.cuda.get_device_properties(0).total_memory if gpu else None)
    corpus.tokens("train"), corpus.tokens("val")  # a damaged corpus fails here, before the run folder exists
    check_new(run_dir, f"'flopwise train {run_dir}'", log)
    start_run_dir(run_dir)
    shutil.copyfile(corpus.tokenizer_path, run_dir / "tokenizer.model")
    write_config(run_dir, model, train, {"path": str(corpus.path.resolve()), "hash": corpus.meta["hash"],
                                         "n_tokens_train": corpus.meta["n_tokens_train"],
                                         "n_tokens_val": corpus.meta["n_tokens_val"]})
    return run_dir


def require_device(name: str) -> None:
    """Refuse a CUDA device on a machine without one (before a run is written, and when it trains)."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FlopwiseError("--device cuda, but this machine has no usable CUDA GPU: use --device cpu (or auto)")


def read_run_config(run_dir: str | Path) -> tuple[ModelConfig, TrainConfig, dict]:
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise FlopwiseError(f"{run_dir} does not exist: give a run directory (made by 'flopwise train --out')")
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise FlopwiseError(f"{run_dir} is not a run directory (no readable config.json)") from None
    if not isinstance(config, dict):
        raise FlopwiseError(f"{run_dir} is not a run directory (its config.json is not flopwise's)")
    if config.get("version") != CONFIG_VERSION:
        raise FlopwiseError(f"{run_dir} was written by another flopwise version (config version "
                            f"{config.get('version')}, this one reads {CONFIG_VERSION})")
    return ModelConfig.from_dict(config["model"]), TrainConfig.from_dict(config["train"]), config


def is_tuning(config: dict) -> bool:
    """Whether a run's config.json describes an instruction-tuning run (its data is instructions.npz)."""
    return config.get("data", {}).get("kind") == "instructions"


# ---- checkpoints, metrics, final.json ----

SPEED_FILE = "speed.json"  # what auto chose at the run's first start (precision, compile, kernel); a resume keeps it
LEGACY_PRECISION_FILE = "precision.txt"  # runs started before compile was chosen: precision only, eager


def read_speed(run_dir: str | Path) -> dict | None:
    """``{"precision": "bf16" | "fp32", "compile": bool, "kernel": "torch" | "c", "passes": int}`` chosen at the run's
    first start (runs from before the C step have no kernel: torch; "passes", the C step's sequences a pass, 0: all),
    or None."""
    run_dir = Path(run_dir)
    try:
        speed = json.loads((run_dir / SPEED_FILE).read_text())
    except (OSError, ValueError):
        try:
            speed = {"precision": (run_dir / LEGACY_PRECISION_FILE).read_text().strip(), "compile": False}
        except OSError:
            return None
    ok = isinstance(speed, dict) and speed.get("precision") in ("bf16", "fp32") and \
        isinstance(speed.get("compile"), bool) and speed.setdefault("kernel", "torch") in KERNELS and \
        type(speed.setdefault("passes", 0)) is int and speed["passes"] >= 0
    return speed if ok else None


KERNELS = ("torch", "c")  # who computes a training step: PyTorch (eager or compiled), or the C step (training/step.c)


def write_speed(run_dir: str | Path, precision: str, compiled: bool, kernel: str = "torch", passes: int = 0) -> None:
    speed = {"precision": precision, "compile": compiled, "kernel": kernel}
    if kernel == "c":
        speed["passes"] = passes
    atomic_write_text(Path(run_dir) / SPEED_FILE, json.dumps(speed) + "\n")


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer, step: int, wall_seconds: float) -> None:
    """Atomically write the state needed to continue at ``step``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"version": CONFIG_VERSION, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step, "wall_seconds": wall_seconds, "torch_rng": torch.get_rng_state()}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a checkpoint is only ever replaced atomically, so this is real damage
        run = path.parent.parent
        raise FlopwiseError(f"checkpoint {path} is damaged ({type(e).__name__}): delete {path} and "
                            f"{run / 'final.json'}, then 'flopwise train {run}' trains the run again") from None


def latest_checkpoint(run_dir: str | Path) -> Path:
    return Path(run_dir) / "ckpt" / "latest.pt"


def load_model(run_dir: str | Path, device: str | torch.device = "cpu") -> Llama:
    """The trained (or latest checkpointed) model of a run directory, LoRA adapters merged."""
    run_dir = Path(run_dir)
    mc, tc, _ = read_run_config(run_dir)
    ckpt = load_checkpoint(latest_checkpoint(run_dir))
    if ckpt is None and (run_dir / "final.json").exists():
        raise FlopwiseError(f"{run_dir} is finished but its checkpoint is gone: delete {run_dir / 'final.json'}, "
                            f"then 'flopwise train {run_dir}' trains it again")
    if ckpt is None:
        raise FlopwiseError(f"{run_dir} has no checkpoint yet: train it first ('flopwise train {run_dir}')")
    model = Llama(mc)
    if tc.lora_rank:  # a LoRA run's checkpoint holds adapters: load them, then fold them into the weights
        apply_lora(model, tc.lora_rank, tc.lora_alpha, tc.lora_targets)
    model.load_state_dict(ckpt["model"])
    if tc.lora_rank:
        merge_lora(model)
    return model.to(device).eval()


def read_metrics(run_dir: Path, before_step: int) -> list[str]:
    """metrics.jsonl lines of steps before ``before_step`` (drops a torn last line)."""
    path = run_dir / "metrics.jsonl"
    keep = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] < before_step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return keep


def trained_flops(run_dir: str | Path) -> float:
    """The training FLOPs a run had counted at its last logged step (0 before its first): its progress while it
    trains, read from the end of metrics.jsonl (a torn last line is skipped)."""
    try:
        with open(Path(run_dir) / "metrics.jsonl", "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))  # a line is a few hundred bytes
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return 0.0
    for line in reversed(lines):
        try:
            return float(json.loads(line)["flops"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return 0.0


def read_final(run_dir: str | Path) -> dict | None:
    """final.json of a finished run, None while it is not finished."""
    path = Path(run_dir) / "final.json"
    return json.loads(path.read_text()) if path.exists() else None


def write_final(run_dir: Path, final: dict) -> None:
    atomic_write_text(run_dir / "final.json", json.dumps(final, indent=2) + "\n")


# ---- locks ----

@contextlib.contextmanager
def run_lock(run_dir: Path, rank: int = 0):
    """Hold an exclusive lock on a run while training it; released by the OS if the process dies."""
    if rank != 0:
        yield
        return
    fh = open(run_dir / ".lock", "w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise FlopwiseError(f"{run_dir} is being trained by another process: wait for it or stop it") from None
    try:
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def run_is_locked(run_dir: str | Path) -> bool:
    path = Path(run_dir) / ".lock"
    if not path.exists():
        return False
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False
