"""--log-to: TensorBoard and W&B receive what metrics.jsonl records (skipped where they are not installed)."""

import json
import os
import signal
import subprocess
import sys

import pytest

from flopwise.config import TrainConfig, check_tracker
from flopwise.errors import FlopwiseError
from flopwise.model.llama import ModelConfig
from flopwise.run import new_run
from flopwise.training.trainer import KILL_AT_STEP_ENV, train


def _run(bundled, tmp_path, name, **kw):
    mc = ModelConfig(vocab_size=bundled.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=96,
                     seq_len=32, tie_embeddings=True)
    tc = TrainConfig(n_tokens=32 * 8 * 30, batch_tokens=32 * 8, micro_batch=8, ckpt_every=5, eval_every=10,
                     eval_windows=4, final_eval_windows=8, log_every=1, precision="fp32", compile="off", **kw)
    return new_run(tmp_path / name, mc, tc, bundled)


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_unknown_or_missing_tracker_is_one_line(monkeypatch):
    with pytest.raises(FlopwiseError, match="--log-to must be none, tensorboard, wandb, got 'mlflow'"):
        check_tracker("mlflow")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(FlopwiseError, match=r"--log-to tensorboard needs tensorboard, which is not installed: "
                                            r"pip install 'flopwise\[track\]'"):
        check_tracker("tensorboard")


def test_tensorboard_mirrors_metrics_and_a_resume_leaves_no_duplicate_steps(bundled, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _run(bundled, tmp_path, "tb", log_to="tensorboard")
    # killed after step 13: the last checkpoint is step 10, so steps 11-13 are logged twice unless purged
    proc = subprocess.run([sys.executable, "-m", "flopwise", "train", str(run), "--quiet"],
                          env={**os.environ, KILL_AT_STEP_ENV: "13"}, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    final = train(run, quiet=True)
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    losses = events.Scalars("loss")
    assert [e.step for e in losses] == [r["step"] + 1 for r in _metrics(run)] == list(range(1, 31))
    assert [e.value for e in losses] == pytest.approx([r["loss"] for r in _metrics(run)], rel=1e-6)
    vals = events.Scalars("val_loss")
    assert [e.step for e in vals] == [10, 20, 30] and vals[-1].value == pytest.approx(final["val_loss"], rel=1e-6)
    assert events.Scalars("final/val_loss")[0].value == pytest.approx(final["val_loss"], rel=1e-6)
    assert events.Tags()["tensors"] == ["config/text_summary"]  # the run's config as text


def test_a_resumed_runs_event_file_sorts_after_the_killed_runs(tmp_path):
    """Readers take event files in name order (creation second, host, pid): a resume within the same second
    as the killed run, from a process with a smaller pid, must still come second for its purge to apply."""
    import time

    from flopwise.training.tracking import _after_existing_events

    now = int(time.time())
    (tmp_path / f"events.out.tfevents.{now}.host.99999.0").write_bytes(b"")
    _after_existing_events(tmp_path)
    assert int(time.time()) > now


def test_wandb_offline_run_holds_the_metrics(bundled, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = _run(bundled, tmp_path, "wb", log_to="wandb")
    final = train(run, quiet=True)
    run_id = (run / "wandb-id").read_text().strip()
    offline = list((run / "wandb").glob(f"offline-run-*-{run_id}"))
    records = list(offline[0].glob("*.wandb")) if len(offline) == 1 else []
    assert records, "an offline run whose file 'wandb sync' uploads"
    raw = records[0].read_bytes()  # protobuf records (wandb-core writes them; no Python reader ships now)
    for key in (b"loss", b"val_loss", b"tok_per_s", b"lr", b"n_params"):  # history, summary and config keys
        assert key in raw
    assert json.dumps(final["val_loss"]).encode() in raw  # the summary holds final.json's loss, as JSON
