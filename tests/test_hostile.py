"""Hostile input, command by command: every case is refused with one line on stderr and exit code 2, no
traceback, and leaves every file that existed byte for byte as it was (and creates none).

The commands run in this process (``flopwise.cli.main``), so the table costs no interpreter start-ups; a few
cases at the end run the real entry point to show the two agree.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

W = "{w}"  # the world folder: user files and fixtures, the cwd of every case


def flopwise(argv: list[str], stdin: str = "") -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``flopwise *argv`` run in this process; an escaping exception is a traceback."""
    from flopwise.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin)
    threads = torch.get_num_threads()

    def too_long(*_):
        raise TimeoutError("still running after 30 s: the command did not refuse its input")

    signal.signal(signal.SIGALRM, too_long)
    signal.alarm(30)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:  # noqa: BLE001  (anything else would have been a traceback)
        import traceback

        code, err = 1, io.StringIO("Traceback (most recent call last):\n" + "".join(traceback.format_exception(e)))
    finally:
        signal.alarm(0)
        sys.stdin = old_stdin
        torch.set_num_threads(threads)
    return code, out.getvalue(), err.getvalue()


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file and folder under ``roots``: content hash and mode, so a change of either shows."""
    state = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            key = str(p)
            if p.is_dir():
                state[key] = f"dir {p.stat().st_mode:o}"
            else:
                state[key] = f"{hashlib.sha1(p.read_bytes()).hexdigest()} {p.stat().st_mode:o}"
    return state


@pytest.fixture(scope="module")
def world(bundled, tmp_path_factory):
    """A user's folder: their own files beside a trained run, its GGUF export, a plan, a runs table, etc."""
    from flopwise.config import TrainConfig
    from flopwise.infer.export import export_gguf
    from flopwise.laws.fit import synthetic_runs
    from flopwise.laws.law import REGISTRY
    from flopwise.model.llama import ModelConfig
    from flopwise.run import new_run
    from flopwise.training.trainer import train

    w = tmp_path_factory.mktemp("world")
    (w / "notes.txt").write_text("my own notes\n")
    (w / "docs" / "sub").mkdir(parents=True)
    (w / "docs" / "a.md").write_text("# mine\n")
    (w / "docs" / "sub" / "b.md").write_text("also mine\n")
    (w / "mine").mkdir()
    (w / "mine" / "Modelfile").write_text("FROM llama3\n")  # the user's own ollama Modelfile
    (w / "empty.txt").write_text("")
    (w / "blank.txt").write_text("   \n\n")
    (w / "binary.bin").write_bytes(np.random.default_rng(0).integers(0, 256, 8192, dtype=np.uint8).tobytes())
    (w / "bad.json").write_text("{not json")
    (w / "list.json").write_text("[1, 2, 3]")
    (w / "story.txt").write_text("Once upon a time there was a cat. " * 50 + "\n\nThe end came soon. " * 50)
    (w / "alpaca.json").write_text(json.dumps([{"instruction": f"Say {i}", "input": "", "output": f"{i}"}
                                               for i in range(40)]))
    (w / "noout.json").write_text(json.dumps([{"instruction": "Say hi", "input": ""}]))
    (w / "typo.json").write_text(json.dumps({"d_modle": 64, "n_layers": 2, "vocab_size": bundled.vocab_size}))
    (w / "cfgdir").mkdir()  # a folder holding only the user's own config.json: not a failed start of ours
    (w / "cfgdir" / "config.json").write_text(json.dumps({"d_model": 64, "n_layers": 2, "n_heads": 2,
                                                          "n_kv_heads": 2, "d_ff": 128, "seq_len": 64,
                                                          "vocab_size": bundled.vocab_size}))
    (w / "heads.json").write_text(json.dumps({"d_model": 64, "n_layers": 2, "n_heads": 3, "n_kv_heads": 3,
                                              "d_ff": 128, "seq_len": 64, "vocab_size": bundled.vocab_size}))
    runs = synthetic_runs(REGISTRY["epoch"], [1e17, 3e17, 1e18], n_per_budget=5)
    (w / "runs.csv").write_text("n_params,n_tokens,loss\n" + "".join(
        f"{n:.6g},{d:.6g},{x:.6g}\n" for n, d, x in zip(runs.n_params, runs.n_tokens, runs.loss, strict=True)))
    (w / "few.csv").write_text("n_params,n_tokens,loss\n1e6,2e7,3.1\n")
    (w / "nocols.csv").write_text("size,data,val\n1e6,2e7,3.1\n")
    (w / "neg.csv").write_text("n_params,n_tokens,loss\n1e6,2e7,-3.1\n2e6,1e7,3.0\n4e6,5e6,3.2\n")
    from flopwise.data.prepare import bundled_corpus, prepare

    (w / "other.txt").write_text(Path(bundled_corpus()[1]).read_text()[:300_000])
    other = prepare([w / "other.txt"], tmp_path_factory.mktemp("other"), vocab_size=bundled.vocab_size,
                    log=lambda m: None).path  # same vocabulary size, another tokenizer
    mc = ModelConfig(vocab_size=bundled.vocab_size, d_model=64, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=192,
                     seq_len=64, tie_embeddings=True)
    tc = TrainConfig(n_tokens=64 * 8 * 6, batch_tokens=64 * 8, micro_batch=8, ckpt_every=3, eval_every=3,
                     eval_windows=4, final_eval_windows=4)
    train(new_run(w / "run", mc, tc, bundled), quiet=True)
    export_gguf(w / "run", w / "model.gguf", "f32", log=lambda m: None)
    gguf = (w / "model.gguf").read_bytes()
    (w / "truncated.gguf").write_bytes(gguf[: len(gguf) // 3])
    (w / "notgguf.gguf").write_bytes(b"GGUF" + b"\xff" * 64)
    shutil.copytree(w / "run", w / "damaged")
    (w / "damaged" / "ckpt" / "latest.pt").write_bytes(b"not a checkpoint")
    shutil.copytree(w / "run", w / "nockpt")
    shutil.rmtree(w / "nockpt" / "ckpt")
    code, out, err = flopwise(["plan", "--flops", "1e15", "--json"])
    assert code == 0, err
    (w / "plan.json").write_text(out)
    (w / "oldplan.json").write_text(json.dumps({**json.loads(out), "plan_version": 99}))
    return {"w": w, "run": w / "run", "corpus": bundled.path, "other": other, "gguf": w / "model.gguf"}


#                                  argv (placeholders: {w} {run} {corpus} {other} {gguf})     the error names
CASES: list[tuple[str, list[str], str]] = [
    # --- the command line itself
    ("unknown-command", ["nope"], "No such command 'nope'"),
    ("option-typo", ["plan", "--flop", "1e21"], "No such option: --flop"),
    ("extra-argument", ["plan", "--flops", "1e21", "extra"], "unexpected extra argument"),
    ("not-a-number", ["plan", "--flops", "lots"], "'--flops'"),
    ("missing-argument", ["fit"], "Missing argument 'RUNS'"),
    ("sweep-unknown", ["sweep", "design"], "No such command 'design'"),
    # --- prepare
    ("prepare-missing-file", ["prepare", "{w}/nope.txt", "--out", "{w}/c1"], "does not exist"),
    ("prepare-empty-file", ["prepare", "{w}/empty.txt", "--out", "{w}/c1"], "holds no text"),
    ("prepare-blank-file", ["prepare", "{w}/blank.txt", "--out", "{w}/c1"], "holds no text"),
    ("prepare-binary", ["prepare", "{w}/binary.bin", "--out", "{w}/c1"], "not text"),
    ("prepare-into-user-folder", ["prepare", "{w}/story.txt", "--out", "{w}/docs"], "holds other files"),
    ("prepare-into-file", ["prepare", "{w}/story.txt", "--out", "{w}/notes.txt"], "is a file"),
    ("prepare-vocab-zero", ["prepare", "{w}/story.txt", "--vocab-size", "0", "--out", "{w}/c1"], "--vocab-size"),
    ("prepare-vocab-huge", ["prepare", "{w}/story.txt", "--vocab-size", "99999999", "--out", "{w}/c1"],
     "--vocab-size"),
    ("prepare-val-fraction-zero", ["prepare", "{w}/story.txt", "--val-fraction", "0", "--out", "{w}/c1"],
     "--val-fraction"),
    ("prepare-val-fraction-one", ["prepare", "{w}/story.txt", "--val-fraction", "1", "--out", "{w}/c1"],
     "--val-fraction"),
    ("prepare-val-fraction-negative", ["prepare", "{w}/story.txt", "--val-fraction", "-0.1", "--out", "{w}/c1"],
     "--val-fraction"),
    ("prepare-val-empty", ["prepare", "{w}/story.txt", "--val", "{w}/empty.txt", "--out", "{w}/c1"],
     "empty.txt holds no text"),
    ("prepare-val-missing", ["prepare", "{w}/story.txt", "--val", "{w}/nope.txt", "--out", "{w}/c1"],
     "does not exist"),
    ("prepare-folder-without-text", ["prepare", "{w}/docs/sub/nothing", "--out", "{w}/c1"], "does not exist"),
    ("prepare-vocab-text", ["prepare", "{w}/story.txt", "--vocab-size", "big"], "'--vocab-size'"),
    # --- train: options checked before the run folder exists
    ("train-no-out", ["train", "--data", "{corpus}", "--n-params", "2e5", "--tokens", "1e5"], "no run directory"),
    ("train-micro-batch-zero", ["train", "--data", "{corpus}", "--n-params", "2e5", "--tokens", "1e5",
                                "--micro-batch", "0", "--out", "{w}/r1"], "--micro-batch"),
    ("train-lr-negative", ["train", "--data", "{corpus}", "--n-params", "2e5", "--tokens", "1e5", "--lr", "-1",
                           "--out", "{w}/r1"], "--lr"),
    ("train-lr-nan", ["train", "--data", "{corpus}", "--n-params", "2e5", "--tokens", "1e5", "--lr", "nan",
                      "--out", "{w}/r1"], "--lr"),
    ("train-precision", ["train", "--data", "{corpus}", "--n-params", "2e5", "--tokens", "1e5", "--precision",
                         "foo", "--out", "{w}/r1"], "--precision"),
    ("train-schedule", ["train", "--data", "{corpus}", "--n-params", "2e5", "--tokens", "1e5", "--schedule", "foo",
                        "--out", "{w}/r1"], "--schedule"),
    ("train-optimizer", ["train", "--data", "{corpus}", "--n-params", "2e5", "--tokens", "1e5", "--optimizer", "sgd",
                         "--out", "{w}/r1"], "--optimizer"),
    ("train-compile", ["train", "--data", "{corpus}", "--n-params", "2e5", "--tokens", "1e5", "--compile", "maybe",
                       "--out", "{w}/r1"], "--compile"),
    ("train-device", ["train", "--data", "{corpus}", "--n-params", "2e5", "--tokens", "1e5", "--device", "tpu",
                      "--out", "{w}/r1"], "--device"),
    *([] if torch.cuda.is_available() else [
        ("train-cuda-without-gpu", ["train", "--data", "{corpus}", "--n-params", "2e5", "--tokens", "1e5",
                                    "--device", "cuda", "--out", "{w}/r1"], "no usable CUDA GPU")]),
    ("train-threads", ["train", "--data", "{corpus}", "--n-params", "2e5", "--tokens", "1e5", "--threads", "-1",
                       "--out", "{w}/r1"], "--threads"),
    ("train-cooldown-fraction", ["train", "--data", "{corpus}", "--n-params", "2e5", "--tokens", "1e5",
                                 "--schedule", "wsd", "--cooldown-fraction", "2", "--out", "{w}/r1"],
     "--cooldown-fraction"),
    ("train-cooldown-shape", ["train", "--data", "{corpus}", "--n-params", "2e5", "--tokens", "1e5",
                              "--schedule", "wsd", "--cooldown-shape", "cubic", "--out", "{w}/r1"], "--cooldown-shape"),
    ("train-ckpt-every", ["train", "--data", "{corpus}", "--n-params", "2e5", "--tokens", "1e5", "--ckpt-every",
                          "-1", "--out", "{w}/r1"], "--ckpt-every"),
    ("train-eval-every", ["train", "--data", "{corpus}", "--n-params", "2e5", "--tokens", "1e5", "--eval-every",
                          "-2", "--out", "{w}/r1"], "--eval-every"),
    ("train-batch-tokens", ["train", "--data", "{corpus}", "--n-params", "2e5", "--tokens", "1e5",
                            "--batch-tokens", "0", "--out", "{w}/r1"], "--batch-tokens"),
    ("train-n-params-negative", ["train", "--data", "{corpus}", "--n-params", "-5", "--tokens", "1e5",
                                 "--out", "{w}/r1"], "--n-params"),
    ("train-n-params-absurd", ["train", "--data", "{corpus}", "--n-params", "1e12", "--tokens", "1e9",
                               "--out", "{w}/r1"], "more than this machine"),
    ("train-tokens-zero", ["train", "--data", "{corpus}", "--n-params", "2e5", "--tokens", "0", "--out", "{w}/r1"],
     "--tokens"),
    ("train-tokens-negative", ["train", "--data", "{corpus}", "--n-params", "2e5", "--tokens", "-1e5",
                               "--out", "{w}/r1"], "--tokens"),
    ("train-tokens-too-few", ["train", "--data", "{corpus}", "--n-params", "2e5", "--tokens", "100",
                              "--out", "{w}/r1"], "smaller than one batch"),
    ("train-flops-negative", ["train", "--data", "{corpus}", "--n-params", "2e5", "--flops", "-1",
                              "--out", "{w}/r1"], "--flops"),
    ("train-two-budgets", ["train", "--data", "{corpus}", "--n-params", "2e5", "--tokens", "1e5", "--flops", "1e12",
                           "--out", "{w}/r1"], "give the training budget once"),
    ("train-no-budget", ["train", "--data", "{corpus}", "--n-params", "2e5", "--out", "{w}/r1"],
     "give the training budget once"),
    ("train-no-model", ["train", "--data", "{corpus}", "--tokens", "1e5", "--out", "{w}/r1"], "no model given"),
    ("train-two-models", ["train", "--data", "{corpus}", "--n-params", "2e5", "--config", "{w}/heads.json",
                          "--tokens", "1e5", "--out", "{w}/r1"], "give the model once"),
    ("train-seq-len-zero", ["train", "--data", "{corpus}", "--n-params", "2e5", "--tokens", "1e5", "--seq-len", "0",
                            "--out", "{w}/r1"], "--seq-len"),
    ("train-seq-len-huge", ["train", "--data", "{corpus}", "--n-params", "2e5", "--tokens", "1e5", "--seq-len",
                            "100000000", "--out", "{w}/r1"], "--seq-len"),
    ("train-config-missing", ["train", "--data", "{corpus}", "--config", "{w}/nope.json", "--tokens", "1e5",
                              "--out", "{w}/r1"], "cannot read --config"),
    ("train-config-bad-json", ["train", "--data", "{corpus}", "--config", "{w}/bad.json", "--tokens", "1e5",
                               "--out", "{w}/r1"], "cannot read --config"),
    ("train-config-not-object", ["train", "--data", "{corpus}", "--config", "{w}/list.json", "--tokens", "1e5",
                                 "--out", "{w}/r1"], "--config"),
    ("train-config-typo", ["train", "--data", "{corpus}", "--config", "{w}/typo.json", "--tokens", "1e5",
                           "--out", "{w}/r1"], "d_modle"),
    ("train-config-heads", ["train", "--data", "{corpus}", "--config", "{w}/heads.json", "--tokens", "1e5",
                            "--out", "{w}/r1"], "n_heads"),
    ("train-plan-missing", ["train", "--data", "{corpus}", "--plan", "{w}/nope.json", "--out", "{w}/r1"],
     "cannot read --plan"),
    ("train-plan-bad-json", ["train", "--data", "{corpus}", "--plan", "{w}/bad.json", "--out", "{w}/r1"],
     "cannot read --plan"),
    ("train-plan-not-plan", ["train", "--data", "{corpus}", "--plan", "{w}/list.json", "--out", "{w}/r1"],
     "is not a plan"),
    ("train-plan-version", ["train", "--data", "{corpus}", "--plan", "{w}/oldplan.json", "--out", "{w}/r1"],
     "version 99"),
    ("train-plan-other-vocab", ["train", "--data", "{corpus}", "--plan", "{w}/plan.json", "--out", "{w}/r1"],
     "vocab"),
    ("train-data-missing", ["train", "--data", "{w}/nope", "--n-params", "2e5", "--tokens", "1e5", "--out",
                            "{w}/r1"], "does not exist"),
    ("train-data-binary", ["train", "--data", "{w}/binary.bin", "--n-params", "2e5", "--tokens", "1e5", "--out",
                           "{w}/r1"], "not text"),
    ("train-out-user-folder", ["train", "--data", "{corpus}", "--n-params", "2e5", "--tokens", "1e5", "--out",
                               "{w}/docs"], "holds other files"),
    ("train-out-file", ["train", "--data", "{corpus}", "--n-params", "2e5", "--tokens", "1e5", "--out",
                        "{w}/notes.txt"], "is a file"),
    ("train-not-a-run", ["train", "{w}/docs"], "not a run directory"),
    ("train-into-folder-of-its-config", ["train", "--data", "{corpus}", "--config", "{w}/cfgdir/config.json",
                                         "--tokens", "1e5", "--out", "{w}/cfgdir"], "holds other files"),
    ("train-missing-run", ["train", "{w}/nope"], "does not exist"),
    ("train-run-and-out", ["train", "{run}", "--out", "{w}/r2"], "not both"),
    ("train-existing-with-model", ["train", "{run}", "--n-params", "2e5"], "already holds a run"),
    ("train-resume-changed", ["train", "{run}", "--lr", "0.1"], "already holds a run"),
    # --- eval
    ("eval-missing", ["eval", "{w}/nope"], "does not exist"),
    ("eval-not-run", ["eval", "{w}/docs"], "not a run directory"),
    ("eval-windows-zero", ["eval", "{run}", "--windows", "0"], "--windows"),
    ("eval-other-tokenizer", ["eval", "{run}", "--data", "{other}"], "tokenizer"),
    ("eval-data-not-corpus", ["eval", "{run}", "--data", "{w}/docs"], "not a prepared corpus"),
    ("eval-instructions-missing", ["eval", "{run}", "--instructions", "{w}/nope.json"], "does not exist"),
    ("eval-instructions-bad", ["eval", "{run}", "--instructions", "{w}/bad.json"], "not valid JSON"),
    ("eval-behaviour-n", ["eval", "{run}", "--instructions", "{w}/alpaca.json", "--behaviour-n", "-1"],
     "--behaviour-n"),
    ("eval-temperature", ["eval", "{run}", "--instructions", "{w}/alpaca.json", "--temperature", "-1"],
     "--temperature"),
    # --- tune
    ("tune-no-out", ["tune", "{run}"], "Missing option '--out'"),
    ("tune-no-base", ["tune", "--out", "{w}/t1"], "no base run"),
    ("tune-missing-base", ["tune", "{w}/nope", "--out", "{w}/t1"], "does not exist"),
    ("tune-base-not-run", ["tune", "{w}/docs", "--out", "{w}/t1"], "not a run directory"),
    ("tune-rank-zero", ["tune", "{run}", "--out", "{w}/t1", "--lora", "--rank", "0"], "--rank"),
    ("tune-rank-without-lora", ["tune", "{run}", "--out", "{w}/t1", "--rank", "4"], "--lora"),
    ("tune-alpha", ["tune", "{run}", "--out", "{w}/t1", "--lora", "--alpha", "0"], "--alpha"),
    ("tune-targets", ["tune", "{run}", "--out", "{w}/t1", "--lora", "--targets", "wq,wz"], "wz"),
    ("tune-epochs-zero", ["tune", "{run}", "--out", "{w}/t1", "--epochs", "0"], "--epochs"),
    ("tune-max-steps-zero", ["tune", "{run}", "--out", "{w}/t1", "--max-steps", "0"], "--max-steps"),
    ("tune-lr", ["tune", "{run}", "--out", "{w}/t1", "--lr", "-1"], "--lr"),
    ("tune-batch-size", ["tune", "{run}", "--out", "{w}/t1", "--batch-size", "0"], "--batch-size"),
    ("tune-behaviour-n", ["tune", "{run}", "--out", "{w}/t1", "--behaviour-n", "-1"], "--behaviour-n"),
    ("tune-threads", ["tune", "{run}", "--out", "{w}/t1", "--threads", "-2"], "--threads"),
    ("tune-data-missing", ["tune", "{run}", "--out", "{w}/t1", "--data", "{w}/nope.json"], "does not exist"),
    ("tune-data-bad-json", ["tune", "{run}", "--out", "{w}/t1", "--data", "{w}/bad.json"], "not valid JSON"),
    ("tune-data-no-output", ["tune", "{run}", "--out", "{w}/t1", "--data", "{w}/noout.json"], "output"),
    ("tune-data-empty", ["tune", "{run}", "--out", "{w}/t1", "--data", "{w}/empty.txt"], "no instruction records"),
    ("tune-out-user-folder", ["tune", "{run}", "--out", "{w}/docs"], "holds other files"),
    ("tune-out-file", ["tune", "{run}", "--out", "{w}/notes.txt"], "is a file"),
    ("tune-out-pretraining-run", ["tune", "{run}", "--out", "{run}"], "pre-training run"),
    # --- generate
    ("generate-missing", ["generate", "{w}/nope", "--prompt", "hi"], "does not exist"),
    ("generate-not-run", ["generate", "{w}/docs", "--prompt", "hi"], "not a run directory"),
    ("generate-text-file", ["generate", "{w}/notes.txt", "--prompt", "hi"], "not a run directory or a .gguf"),
    ("generate-truncated-gguf", ["generate", "{w}/truncated.gguf", "--prompt", "hi"], "truncated"),
    ("generate-not-gguf", ["generate", "{w}/notgguf.gguf", "--prompt", "hi"], "GGUF"),
    ("generate-max-tokens-zero", ["generate", "{run}", "--prompt", "hi", "--max-tokens", "0"], "--max-tokens"),
    ("generate-max-tokens-negative", ["generate", "{run}", "--prompt", "hi", "--max-tokens", "-5"], "--max-tokens"),
    ("generate-max-tokens-float", ["generate", "{run}", "--prompt", "hi", "--max-tokens", "1e9"], "--max-tokens"),
    ("generate-max-tokens-huge", ["generate", "{run}", "--prompt", "hi", "--max-tokens", "1000000000"],
     "--max-tokens"),
    ("generate-temperature", ["generate", "{run}", "--prompt", "hi", "--temperature", "-1"], "--temperature"),
    ("generate-top-k", ["generate", "{run}", "--prompt", "hi", "--top-k", "-1"], "--top-k"),
    ("generate-top-p-zero", ["generate", "{run}", "--prompt", "hi", "--top-p", "0"], "--top-p"),
    ("generate-top-p-big", ["generate", "{run}", "--prompt", "hi", "--top-p", "1.5"], "--top-p"),
    ("generate-repetition-penalty", ["generate", "{run}", "--prompt", "hi", "--repetition-penalty", "0"],
     "--repetition-penalty"),
    ("generate-dtype", ["generate", "{run}", "--prompt", "hi", "--dtype", "fp8"], "--dtype"),
    ("generate-threads", ["generate", "{run}", "--prompt", "hi", "--threads", "-1"], "--threads"),
    ("generate-empty-prompt", ["generate", "{run}", "--prompt", "  "], "empty prompt"),
    ("generate-empty-stdin", ["generate", "{run}"], "empty prompt"),
    ("generate-long-prompt", ["generate", "{run}", "--prompt", "word " * 400], "context"),
    ("generate-damaged-checkpoint", ["generate", "{w}/damaged", "--prompt", "hi"], "is damaged"),
    ("export-damaged-checkpoint", ["export", "{w}/damaged", "--format", "gguf", "--out", "{w}/d.gguf"],
     "is damaged"),
    ("eval-unfinished-gone", ["eval", "{w}/nockpt"], "checkpoint is gone"),
    # --- chat
    ("chat-missing", ["chat", "{w}/nope"], "does not exist"),
    ("chat-dtype", ["chat", "{run}", "--dtype", "fp8"], "--dtype"),
    ("chat-max-tokens", ["chat", "{run}", "--max-tokens", "0"], "--max-tokens"),
    ("chat-temperature", ["chat", "{run}", "--temperature", "-0.5"], "--temperature"),
    ("chat-top-k", ["chat", "{run}", "--top-k", "-3"], "--top-k"),
    # --- serve (refused before loading or binding)
    ("serve-port-high", ["serve", "{run}", "--port", "70000"], "--port"),
    ("serve-port-zero", ["serve", "{run}", "--port", "0"], "--port"),
    ("serve-max-queue", ["serve", "{run}", "--max-queue", "0"], "--max-queue"),
    ("serve-missing", ["serve", "{w}/nope"], "does not exist"),
    ("serve-dtype", ["serve", "{run}", "--dtype", "fp8"], "--dtype"),
    ("serve-port-in-use", ["serve", "{run}", "--port", "{busy_port}"], "in use"),
    # --- export
    ("export-missing", ["export", "{w}/nope", "--format", "gguf", "--out", "{w}/x.gguf"], "does not exist"),
    ("export-not-run", ["export", "{w}/docs", "--format", "gguf", "--out", "{w}/x.gguf"], "not a run directory"),
    ("export-format", ["export", "{run}", "--format", "onnx", "--out", "{w}/x"], "--format"),
    ("export-quant", ["export", "{run}", "--format", "gguf", "--quant", "q3_k", "--out", "{w}/x.gguf"], "--quant"),
    ("export-quant-hf", ["export", "{run}", "--format", "hf", "--quant", "q8_0", "--out", "{w}/x"], "--quant"),
    ("export-over-user-file", ["export", "{run}", "--format", "gguf", "--out", "{w}/notes.txt"], "notes.txt"),
    ("export-over-user-folder", ["export", "{run}", "--format", "hf", "--out", "{w}/docs"], "docs"),
    ("export-hf-into-file", ["export", "{run}", "--format", "hf", "--out", "{w}/notes.txt"], "notes.txt"),
    ("export-user-modelfile", ["export", "{run}", "--format", "gguf", "--out", "{w}/mine/model.gguf"], "Modelfile"),
    ("export-over-foreign-gguf", ["export", "{run}", "--format", "gguf", "--out", "{w}/notgguf.gguf"],
     "without flopwise's mark"),
    # --- plan
    ("plan-no-budget", ["plan"], "no budget given"),
    ("plan-flops-negative", ["plan", "--flops", "-1"], "--flops"),
    ("plan-flops-zero", ["plan", "--flops", "0"], "--flops"),
    ("plan-flops-nan", ["plan", "--flops", "nan"], "--flops"),
    ("plan-flops-absurd", ["plan", "--flops", "1e40"], "--flops"),
    ("plan-two-budgets", ["plan", "--flops", "1e21", "--hours", "10"], "one budget"),
    ("plan-gpu-unknown", ["plan", "--gpu", "h900", "--hours", "10"], "h900"),
    ("plan-gpus-zero", ["plan", "--gpu", "h100", "--gpus", "0", "--hours", "10"], "--gpus"),
    ("plan-hours-negative", ["plan", "--gpu", "h100", "--hours", "-3"], "--hours"),
    ("plan-dollars-negative", ["plan", "--dollars", "-3"], "--dollars"),
    ("plan-mfu-zero", ["plan", "--flops", "1e21", "--mfu", "0"], "--mfu"),
    ("plan-mfu-big", ["plan", "--flops", "1e21", "--mfu", "1.5"], "--mfu"),
    ("plan-price", ["plan", "--flops", "1e21", "--price-per-hour", "-1"], "--price-per-hour"),
    ("plan-law-unknown", ["plan", "--flops", "1e21", "--law", "kaplan2"], "kaplan2"),
    ("plan-law-bad-json", ["plan", "--flops", "1e21", "--law", "{w}/bad.json"], "bad.json"),
    ("plan-law-not-law", ["plan", "--flops", "1e21", "--law", "{w}/list.json"], "list.json"),
    ("plan-device-unknown", ["plan", "--flops", "1e21", "--device", "rpi9"], "rpi9"),
    ("plan-device-and-memory", ["plan", "--flops", "1e21", "--device", "rpi5", "--max-memory", "1GB"],
     "--device or --max-memory"),
    ("plan-bits", ["plan", "--flops", "1e21", "--device", "rpi5", "--bits", "3"], "--bits"),
    ("plan-max-memory-text", ["plan", "--flops", "1e21", "--max-memory", "lots"], "as a size"),
    ("plan-max-memory-negative", ["plan", "--flops", "1e21", "--max-memory", "-4GB"], "--max-memory"),
    ("plan-seq-len", ["plan", "--flops", "1e21", "--seq-len", "0"], "--seq-len"),
    ("plan-vocab", ["plan", "--flops", "1e21", "--vocab-size", "0"], "--vocab-size"),
    ("plan-pue", ["plan", "--flops", "1e21", "--pue", "0.5"], "--pue"),
    ("plan-carbon", ["plan", "--flops", "1e21", "--carbon", "-1"], "--carbon"),
    ("plan-unique-tokens", ["plan", "--flops", "1e21", "--unique-tokens", "-1"], "--unique-tokens"),
    ("plan-inference-tokens", ["plan", "--flops", "1e21", "--inference-tokens", "-1"], "--inference-tokens"),
    # --- fit
    ("fit-missing", ["fit", "{w}/nope.csv"], "does not exist"),
    ("fit-empty", ["fit", "{w}/empty.txt"], "no runs"),
    ("fit-no-columns", ["fit", "{w}/nocols.csv"], "n_params"),
    ("fit-one-run", ["fit", "{w}/few.csv"], "runs"),
    ("fit-negative-loss", ["fit", "{w}/neg.csv"], "loss"),
    ("fit-bootstrap-negative", ["fit", "{w}/runs.csv", "--bootstrap", "-5"], "--bootstrap"),
    ("fit-holdout-too-many", ["fit", "{w}/runs.csv", "--holdout-largest", "99"], "--holdout-largest"),
    ("fit-holdout-negative", ["fit", "{w}/runs.csv", "--holdout-largest", "-1"], "--holdout-largest"),
    ("fit-approach", ["fit", "{w}/runs.csv", "--approach", "4"], "--approach"),
    ("fit-level-zero", ["fit", "{w}/runs.csv", "--level", "0"], "--level"),
    ("fit-level-big", ["fit", "{w}/runs.csv", "--level", "1.5"], "--level"),
    ("fit-delta", ["fit", "{w}/runs.csv", "--delta", "0"], "--delta"),
    ("fit-degree", ["fit", "{w}/runs.csv", "--degree", "5"], "--degree"),
    ("fit-budgets", ["fit", "{w}/runs.csv", "--budgets", "1e20,x"], "--budgets"),
    ("fit-budgets-negative", ["fit", "{w}/runs.csv", "--budgets", "-1e20"], "--budgets"),
    ("fit-forms", ["fit", "{w}/runs.csv", "--forms", "kaplan"], "kaplan"),
    ("fit-convention", ["fit", "{w}/runs.csv", "--convention", "half"], "--convention"),
    ("fit-workers", ["fit", "{w}/runs.csv", "--workers", "-1"], "--workers"),
    ("fit-out-file", ["fit", "{w}/runs.csv", "--out", "{w}/notes.txt"], "is a file"),
    ("fit-out-user-folder", ["fit", "{w}/runs.csv", "--out", "{w}/docs"], "holds other files"),
    ("fit-directory-not-sweep", ["fit", "{w}/docs"], "no finished runs"),
    # --- sweep
    ("sweep-budgets-negative", ["sweep", "run", "--out", "{w}/s1", "--budgets", "-1e12,1e12", "--dry-run"],
     "--budgets"),
    ("sweep-budgets-text", ["sweep", "run", "--out", "{w}/s1", "--budgets", "abc", "--dry-run"], "--budgets"),
    ("sweep-budgets-absurd", ["sweep", "run", "--out", "{w}/s1", "--budgets", "1e25", "--dry-run"],
     "more than this machine"),
    ("sweep-budgets-tiny", ["sweep", "run", "--out", "{w}/s1", "--budgets", "1e5", "--dry-run"], "budget"),
    ("sweep-no-budgets", ["sweep", "run", "--out", "{w}/s1", "--dry-run"], "--budgets"),
    ("sweep-min-over-max", ["sweep", "run", "--out", "{w}/s1", "--min-flops", "1e13", "--max-flops", "1e12",
                            "--dry-run"], "--min-flops"),
    ("sweep-workers", ["sweep", "run", "--out", "{w}/s1", "--budgets", "1e12", "--workers", "-3", "--dry-run"],
     "--workers"),
    ("sweep-spread", ["sweep", "run", "--out", "{w}/s1", "--budgets", "1e12", "--spread", "0.5", "--dry-run"],
     "--spread"),
    ("sweep-sizes", ["sweep", "run", "--out", "{w}/s1", "--budgets", "1e12", "--sizes", "1", "--dry-run"],
     "--sizes"),
    ("sweep-n-budgets", ["sweep", "run", "--out", "{w}/s1", "--min-flops", "1e12", "--max-flops", "1e13",
                         "--n-budgets", "0", "--dry-run"], "--n-budgets"),
    ("sweep-prior", ["sweep", "run", "--out", "{w}/s1", "--budgets", "1e12", "--prior", "magic", "--dry-run"],
     "magic"),
    ("sweep-schedule", ["sweep", "run", "--out", "{w}/s1", "--budgets", "1e12", "--schedule", "step", "--dry-run"],
     "--schedule"),
    ("sweep-optimizer", ["sweep", "run", "--out", "{w}/s1", "--budgets", "1e12", "--optimizer", "sgd", "--dry-run"],
     "--optimizer"),
    ("sweep-min-steps", ["sweep", "run", "--out", "{w}/s1", "--budgets", "1e12", "--min-steps", "0", "--dry-run"],
     "--min-steps"),
    ("sweep-seq-len", ["sweep", "run", "--out", "{w}/s1", "--budgets", "1e12", "--seq-len", "0", "--dry-run"],
     "--seq-len"),
    ("sweep-out-file", ["sweep", "run", "--out", "{w}/notes.txt", "--data", "{corpus}", "--budgets", "2e11"],
     "is a file"),
    ("sweep-out-user-folder", ["sweep", "run", "--out", "{w}/docs", "--data", "{corpus}", "--budgets", "2e11"],
     "holds other files"),
    ("sweep-data-missing", ["sweep", "run", "--out", "{w}/s1", "--data", "{w}/nope", "--budgets", "1e12"],
     "does not exist"),
    ("sweep-status-missing", ["sweep", "status", "{w}/nope"], "not a sweep"),
    ("sweep-status-not-sweep", ["sweep", "status", "{w}/docs"], "not a sweep"),
    ("sweep-compare-missing", ["sweep", "compare", "{w}/nope", "{w}/runs.csv"], "does not exist"),
    ("sweep-compare-budgets", ["sweep", "compare", "{w}/runs.csv", "{w}/runs.csv", "--budgets", "1e20,x"],
     "--budgets"),
    ("sweep-compare-level", ["sweep", "compare", "{w}/runs.csv", "{w}/runs.csv", "--level", "2"], "--level"),
    ("sweep-compare-out-user-folder", ["sweep", "compare", "{w}/runs.csv", "{w}/runs.csv", "--out", "{w}/docs",
                                       "--bootstrap", "0"], "holds other files"),
    ("sweep-compare-bootstrap", ["sweep", "compare", "{w}/runs.csv", "{w}/runs.csv", "--bootstrap", "-1"],
     "--bootstrap"),
    # --- autopilot
    ("autopilot-budget-text", ["autopilot", "--budget", "lots", "--out", "{w}/a1"], "--budget"),
    ("autopilot-budget-negative", ["autopilot", "--budget", "-5e13", "--out", "{w}/a1"], "--budget"),
    ("autopilot-budget-small", ["autopilot", "--budget", "2e9", "--out", "{w}/a1"], "--budget"),
    ("autopilot-budget-tiny", ["autopilot", "--budget", "1e5", "--out", "{w}/a1"], "--budget"),
    ("autopilot-budget-absurd", ["autopilot", "--budget", "1e30", "--out", "{w}/a1"], "--budget"),
    ("autopilot-budget-and-hours", ["autopilot", "--budget", "5e13", "--gpu", "h100", "--hours", "2", "--out",
                                    "{w}/a1"], "not both"),
    ("autopilot-hours-without-gpu", ["autopilot", "--hours", "2", "--out", "{w}/a1"], "--gpu"),
    ("autopilot-gpu-unknown", ["autopilot", "--gpu", "h900", "--hours", "2", "--out", "{w}/a1"], "h900"),
    ("autopilot-sweep-fraction", ["autopilot", "--sweep-fraction", "1.5", "--out", "{w}/a1"], "--sweep-fraction"),
    ("autopilot-sizes", ["autopilot", "--sizes", "1", "--out", "{w}/a1"], "--sizes"),
    ("autopilot-n-budgets", ["autopilot", "--n-budgets", "1", "--out", "{w}/a1"], "--n-budgets"),
    ("autopilot-vocab", ["autopilot", "--vocab-size", "10", "--out", "{w}/a1"], "--vocab-size"),
    ("autopilot-seq-len", ["autopilot", "--seq-len", "0", "--out", "{w}/a1"], "--seq-len"),
    ("autopilot-bootstrap", ["autopilot", "--bootstrap", "-1", "--out", "{w}/a1"], "--bootstrap"),
    ("autopilot-min-steps", ["autopilot", "--min-steps", "0", "--out", "{w}/a1"], "--min-steps"),
    ("autopilot-optimizer", ["autopilot", "--optimizer", "sgd", "--out", "{w}/a1"], "--optimizer"),
    ("autopilot-compare-same", ["autopilot", "--compare-optimizer", "muon", "--out", "{w}/a1"],
     "--compare-optimizer"),
    ("autopilot-workers", ["autopilot", "--workers", "-1", "--out", "{w}/a1"], "--workers"),
    ("autopilot-mfu", ["autopilot", "--gpu", "h100", "--hours", "1", "--mfu", "0", "--out", "{w}/a1"], "--mfu"),
    ("autopilot-out-file", ["autopilot", "--out", "{w}/notes.txt"], "is a file"),
    ("autopilot-out-user-folder", ["autopilot", "--out", "{w}/docs"], "holds other files"),
    ("autopilot-data-missing", ["autopilot", "--data", "{w}/nope", "--out", "{w}/a1"], "does not exist"),
    ("autopilot-data-binary", ["autopilot", "--data", "{w}/binary.bin", "--out", "{w}/a1"], "not text"),
    # --- hw
    ("hw-probe-device", ["hw", "probe", "--device", "tpu"], "--device"),
]


def _fill(argv: list[str], world: dict) -> list[str]:
    return [a.format(**{k: str(v) for k, v in world.items()}) for a in argv]


@pytest.fixture(scope="module")
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield s.getsockname()[1]


@pytest.mark.parametrize("name,argv,needle", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_refused_cleanly(world, busy_port, name, argv, needle, monkeypatch):
    monkeypatch.chdir(world["w"])
    roots = (world["w"], world["corpus"], world["other"])
    before = snapshot(*roots)
    code, out, err = flopwise(_fill(argv, {**world, "busy_port": busy_port}))
    after = snapshot(*roots)
    assert "Traceback" not in err, err
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle.lower() in err.lower(), err
    assert after == before, sorted(set(after.items()) ^ set(before.items()))


def test_the_real_entry_point_agrees(world):
    """Three cases through 'python -m flopwise': the same one line and exit code 2 as in-process."""
    for argv in (["plan", "--flop", "1e21"], ["fit", str(world["w"] / "runs.csv"), "--level", "0"],
                 ["train", "--micro-batch", "x"]):
        r = subprocess.run([sys.executable, "-m", "flopwise", *argv], capture_output=True, text=True,
                           env={**os.environ}, timeout=120)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.startswith("error: ") and flopwise(argv)[2] == r.stderr
