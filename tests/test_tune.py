import json
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from flopwise.config import TrainConfig, TuneOptions
from flopwise.data.derive import content_words, derive_instructions, split_sentences
from flopwise.data.instructions import (
    PREAMBLE,
    PREAMBLE_INPUT,
    encode_example,
    encode_examples,
    load_instructions,
    record_to_example,
    render_prompt,
)
from flopwise.data.tokenizer import BOS_ID, EOS_ID
from flopwise.errors import FlopwiseError
from flopwise.model.llama import Llama, ModelConfig
from flopwise.model.lora import apply_lora, merge_lora
from flopwise.run import load_model, new_run
from flopwise.training.trainer import KILL_AT_STEP_ENV, train
from flopwise.training.tune import continuation_ok, new_tune_run

OPTS = TuneOptions(max_steps=40, batch_size=8, micro_batch=4)


def cli(*args, timeout=600, input=None):
    return subprocess.run([sys.executable, "-m", "flopwise", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, input=input)


@pytest.fixture(scope="module")
def base(bundled, tmp_path_factory):
    """A briefly trained small base run (context 160: room for the Alpaca prompt and a short story)."""
    mc = ModelConfig(vocab_size=bundled.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192,
                     seq_len=160, tie_embeddings=True)
    tc = TrainConfig(n_tokens=160 * 8 * 20, batch_tokens=160 * 8, micro_batch=8, precision="fp32")
    run = new_run(tmp_path_factory.mktemp("base") / "base", mc, tc, bundled)
    train(run, quiet=True)
    return run


def write_alpaca(path, n=40, long=False):
    rng = random.Random(0)
    recs = []
    for i in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rec = {"instruction": f"Add {a} and {b}.", "output": f"The sum is {a + b}."}
        if long and i == 0:
            rec["input"] = "word " * 300
        recs.append(rec)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_alpaca_template_both_forms():
    assert render_prompt("Say hi.") == f"{PREAMBLE}\n\n### Instruction:\nSay hi.\n\n### Response:\n"
    assert render_prompt("Translate.", "Bonjour") == (
        f"{PREAMBLE_INPUT}\n\n### Instruction:\nTranslate.\n\n### Input:\nBonjour\n\n### Response:\n")
    assert PREAMBLE.startswith("Below is an instruction that describes a task.")
    ex = record_to_example({"instruction": "Say hi.", "input": "", "output": "Hi!"}, "r")
    assert ex.turns == [(render_prompt("Say hi."), "Hi!")]


def test_chat_messages_become_alpaca_turns():
    ex = record_to_example({"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."}]}, "r")
    assert ex.turns[0] == ("Be brief.\n\n### Instruction:\nHi\n\n### Response:\n", "Hello.")
    assert ex.turns[1] == ("\n\n### Instruction:\nBye\n\n### Response:\n", "Goodbye.")
    with pytest.raises(FlopwiseError, match="message 1: role 'bot'"):
        record_to_example({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}, "r")


def test_masking_prompt_tokens_contribute_zero_loss(bundled):
    sp = bundled.tokenizer()
    ex = record_to_example({"instruction": "Write a story.", "output": "Tom ran."}, "r")
    tokens, flags, pc, rc = encode_example(sp, ex, 96)
    n_prompt = 1 + len(sp.encode(ex.turns[0][0]))
    assert tokens[0] == BOS_ID and tokens[-1] == EOS_ID and not pc and not rc
    assert flags == [0] * n_prompt + [1] * (len(tokens) - n_prompt)  # response and its eos carry loss
    enc = encode_examples(sp, [ex, ex], 96)
    assert enc.mask[0].sum() == len(tokens) - n_prompt and enc.mask[0, len(tokens) - 1:].sum() == 0
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=bundled.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2,
                              d_ff=64, seq_len=96))
    rows = torch.from_numpy(enc.tokens)
    x, y, m = rows[:, :-1], rows[:, 1:], torch.from_numpy(enc.mask)
    with torch.no_grad():
        loss = model(x, y, loss_mask=m)
        per_token = torch.nn.functional.cross_entropy(model(x).view(-1, bundled.vocab_size), y.reshape(-1),
                                                      reduction="none").view_as(y)
    assert float(loss) == pytest.approx(float(per_token[m.bool()].mean()), rel=1e-5)
    y2 = y.clone()
    y2[m == 0] = torch.randint(3, bundled.vocab_size, (int((m == 0).sum()),))  # change every prompt target
    with torch.no_grad():
        assert float(model(x, y2, loss_mask=m)) == pytest.approx(float(loss), rel=1e-6)


def test_long_records_cut_the_prompt_not_the_response(bundled):
    sp = bundled.tokenizer()
    ex = record_to_example({"instruction": "Summarise.", "input": "word " * 200, "output": "A short answer."}, "r")
    tokens, flags, pc, rc = encode_example(sp, ex, 64)
    response = sp.encode("A short answer.") + [EOS_ID]
    assert pc and not rc and len(tokens) == 65
    assert tokens[-len(response):] == response and sum(flags) == len(response)
    assert sp.decode(tokens[1:len(tokens) - len(response)]).endswith("### Response:\n")
    huge = record_to_example({"instruction": "Go.", "output": "story " * 200}, "r")
    tokens, flags, pc, rc = encode_example(sp, huge, 64)
    assert rc and len(tokens) == 65 and sum(flags) == 65 - 1 - 8  # a minimal prompt of 8 tokens stays


def test_lora_merge_equals_unmerged_forward():
    torch.manual_seed(0)
    mc = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, seq_len=16)
    model = Llama(mc)
    x = torch.randint(0, 64, (2, 16))
    before = model(x)
    apply_lora(model, rank=4, alpha=8.0)
    assert torch.allclose(model(x), before)  # B starts at zero
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_b"):
                p.normal_(0, 0.1)
    unmerged = model(x)
    assert (unmerged - before).abs().max() > 1e-3
    merged = merge_lora(model)
    assert not any("lora" in n for n in merged.state_dict())
    assert torch.allclose(merged(x), unmerged, atol=1e-5)
    with pytest.raises(FlopwiseError, match="unknown"):
        apply_lora(Llama(mc), 4, 8.0, ["wq", "attn"])


def test_derived_set_is_deterministic_and_built_from_the_story():
    stories = ["Once upon a time, there was a girl named Lily. Lily loved to paint pictures of flowers. "
               "One day she found a purple crayon under the table. She drew a giant garden with it. "
               "Her brother Max smiled at the bright garden."] * 6
    count = lambda s: len(s.split())  # noqa: E731
    a = derive_instructions(stories, 3, count, 200)
    assert a == derive_instructions(stories, 3, count, 200)
    tasks = {r["task"] for r in a}
    assert tasks == {"words", "continue", "about"}
    for r in a:
        if r["task"] == "words":
            assert all(w in r["output"].lower() for w in r["words"]) and all(w in r["instruction"] for w in r["words"])
        elif r["task"] == "continue":
            assert stories[0].startswith(r["input"]) and stories[0].endswith(r["output"])
        else:
            assert r["instruction"] == "Write a story about Lily, who loved to paint pictures of flowers."
    short = derive_instructions(stories, 3, count, 70)  # a tighter budget cuts stories at sentence ends
    assert all(len(split_sentences(r["output"])) < 5 for r in short)
    assert "lily" not in content_words(stories[0]) and "crayon" in content_words(stories[0])
    assert split_sentences('"Wow! Look," said Tom. He ran.') == ['"Wow! Look," said Tom.', "He ran."]


def test_behaviour_checks():
    assert continuation_ok("Tom had a red ball. He threw it.", "The ball flew over the fence.")
    assert not continuation_ok("Tom had a red ball.", "Once upon a time, there was a boy.")
    assert not continuation_ok("Tom had a red ball.", "Tom had a red ball and a hat.")
    assert not continuation_ok("Tom had a red ball.", "Yes.")


def test_bad_instruction_input(tmp_path, base):
    bad = tmp_path / "bad.jsonl"
    arr = tmp_path / "bad.json"
    cases = [(bad, '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": }\n',
              "line 2 is not valid JSON"),
             (bad, '{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', "record 1 .*has no 'output' field"),
             (arr, '[{"instruction": "a", "output": "b"}, {"output": "b"}]', "record 1 has no 'instruction' field"),
             (arr, '[{"instruction": "a", "output": "  "}]', "record 0 has an empty 'output'"),
             (arr, '[{"instruction": "a", "output": "b"},', "not valid JSON")]
    for path, text, match in cases:
        path.write_text(text)
        with pytest.raises(FlopwiseError, match=match):
            load_instructions(path)
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')  # used by the CLI check below
    out = tmp_path / "tuned"
    r = cli("tune", tmp_path / "nope", "--data", write_alpaca(tmp_path / "ok.jsonl"), "--out", out)
    assert r.returncode == 2 and "does not exist" in r.stderr and not out.exists()
    small_ctx = tmp_path / "small"
    mc = ModelConfig(vocab_size=1024, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64, seq_len=48)
    (small_ctx / "ckpt").mkdir(parents=True)
    cfg = json.loads((base / "config.json").read_text())
    (small_ctx / "config.json").write_text(json.dumps({**cfg, "model": mc.to_dict()}))
    torch.save({"model": Llama(mc).state_dict()}, small_ctx / "ckpt" / "latest.pt")
    (small_ctx / "tokenizer.model").write_bytes((base / "tokenizer.model").read_bytes())
    r = cli("tune", small_ctx, "--out", out)
    assert r.returncode == 2 and "no bundled example fits a context of 48 tokens" in r.stderr and not out.exists()
    r = cli("tune", base, "--data", bad, "--out", out)
    assert r.returncode == 2 and "has no 'output' field" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (out / "config.json").exists()


def test_tune_resume_after_kill9_and_truncation_count(base, tmp_path):
    data = write_alpaca(tmp_path / "add.jsonl", n=60, long=True)
    straight = new_tune_run(tmp_path / "straight", base, data, opts=OPTS, log=lambda m: None)
    cfg = json.loads((straight / "config.json").read_text())
    assert cfg["data"]["kind"] == "instructions" and cfg["data"]["prompts_truncated"] == 1
    assert cfg["data"]["responses_truncated"] == 0 and cfg["data"]["n_train"] + cfg["data"]["n_heldout"] == 60
    tc = cfg["train"]
    tc_ckpt = dict(tc, ckpt_every=4, log_every=1)
    cfg["train"] = tc_ckpt
    (straight / "config.json").write_text(json.dumps(cfg))
    expected = train(straight, quiet=True)
    killed = tmp_path / "killed"
    new_tune_run(killed, base, data, opts=OPTS, log=lambda m: None)
    cfg_k = json.loads((killed / "config.json").read_text())
    cfg_k["train"] = dict(cfg_k["train"], ckpt_every=4, log_every=1)
    (killed / "config.json").write_text(json.dumps(cfg_k))
    # killed (SIGKILL) after step 14: the last checkpoint is step 12, metrics run two steps past it
    proc = subprocess.run([sys.executable, "-m", "flopwise", "train", str(killed), "--quiet"],
                          env={**os.environ, KILL_AT_STEP_ENV: "14"}, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL and not (killed / "final.json").exists()
    assert torch.load(killed / "ckpt" / "latest.pt", weights_only=False)["step"] == 12
    assert len((killed / "metrics.jsonl").read_text().splitlines()) == 14
    # the tuning was started with --behaviour-n 0 (kept in tune_eval.json): a resume without it keeps it
    (killed / "tune_eval.json").write_text(json.dumps({"behaviour_n": 0}))
    r = cli("tune", "--out", killed, "--quiet")
    assert r.returncode == 0, r.stderr
    losses = lambda d: [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert np.allclose(losses(killed), losses(straight), rtol=1e-6)
    final = json.loads((killed / "final.json").read_text())
    assert final["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-6)
    report = json.loads((killed / "tune_eval.json").read_text())
    assert report["tuned"]["response_loss"] == pytest.approx(final["val_loss"], rel=1e-4)
    assert report["behaviour_n"] == 0 and not {"words_n", "continuation_n"} & (set(report["base"]) |
                                                                          set(report["tuned"]))


def test_report_line_says_when_the_held_out_set_had_fewer_than_asked():
    from flopwise.cli.tune import _report_line

    r = {"response_loss": 1.25, "continuation_ok": 0.5, "continuation_n": 99, "asked_per_task": 100,
         "words_included": 0.25, "words_n": 100, "word_rate": 0.5}
    line = _report_line("tuned", r)
    assert "continuation ok 50% of 99 (all held out)" in line and "words included 25% of 100 (each" in line


def test_lora_tune_on_bundled_set_merges_for_loading(base, tmp_path):
    out = tmp_path / "lora"
    r = cli("tune", base, "--lora", "--rank", "4", "--max-steps", "6", "--behaviour-n", "2", "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    for k in ("base", "tuned"):
        assert report[k]["words_n"] == 2 and report[k]["continuation_n"] == 2
        assert report[k]["words_included"] in (0.0, 0.5, 1.0)  # a share of two generations
    assert report["tuned"]["response_loss"] < report["base"]["response_loss"]
    for name in ("instructions-train.jsonl", "instructions-heldout.jsonl", "INSTRUCTIONS.md"):
        assert (out / name).exists()
    assert "CDLA-Sharing-1.0" in (out / "INSTRUCTIONS.md").read_text()
    held = [json.loads(x) for x in (out / "instructions-heldout.jsonl").read_text().splitlines()]
    assert {h["task"] for h in held} >= {"words", "about"}
    tuned = load_model(out)
    assert type(tuned) is Llama and set(tuned.state_dict()) == set(load_model(base).state_dict())
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(),
                                                      load_model(base).state_dict().values(), strict=True))
    r = cli("eval", out, "--instructions", out / "instructions-heldout.jsonl", "--behaviour-n", "2", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["words_n"] == 2
    r = cli("chat", out, "--max-tokens", "5", "--seed", "0", "--compile", "off",
            input="Tell me a story.\nAnd another.\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("model> ") == 2 and r.stdout.count("you> ") == 3
    r = cli("generate", out, "--instruct", "--prompt", "Write a story.", "--prompt", "Say hi.", "--max-tokens", "4",
            "--json", "--seed", "0")
    assert r.returncode == 0, r.stderr
    assert [x["prompt"].endswith("### Response:\n") for x in json.loads(r.stdout)] == [True, True]
