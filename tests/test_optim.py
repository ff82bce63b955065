"""Muon beside AdamW: which parameters each updates, and what a run records."""

import copy

import pytest
import torch

from flopwise.config import MUON_LR_SCALE, AutopilotConfig, TrainConfig
from flopwise.errors import FlopwiseError
from flopwise.model.llama import Llama, ModelConfig
from flopwise.model.lora import apply_lora
from flopwise.training.muon import BATCH_MAX_ELEMENTS, BatchedMuon
from flopwise.training.trainer import make_optimizer, param_groups

HIDDEN = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


@pytest.mark.parametrize("tied", [True, False])
def test_every_parameter_in_exactly_one_group_and_muon_gets_only_hidden_matrices(tied):
    model = Llama(ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, seq_len=16,
                              tie_embeddings=tied))
    groups = param_groups(model, "muon")
    names = [n for g in groups.values() for n, _ in g]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # each exactly once
    assert sorted(n for n, _ in groups["muon"]) == sorted(f"layers.{i}.{w}.weight" for i in range(2) for w in HIDDEN)
    assert all(p.dim() == 2 for _, p in groups["muon"])
    assert {n for n, _ in groups["adamw_decay"]} == {"embed.weight"} | (set() if tied else {"head.weight"})
    assert all(p.dim() == 1 for _, p in groups["adamw"])  # norm gains: no weight decay
    assert not param_groups(model, "adamw")["muon"]
    opt = make_optimizer(model, TrainConfig(n_tokens=1, optimizer="muon"), 1e-3)
    assert isinstance(opt.optimizers["muon"], torch.optim.Muon)
    stepped = [id(p) for g in opt.param_groups for p in g["params"]]  # by identity: a tied matrix is one tensor
    assert len(stepped) == len(set(stepped)) and set(stepped) == {id(p) for p in model.parameters()}
    assert (model.head.weight is model.embed.weight) == tied
    assert {g["weight_decay"] for g in opt.optimizers["adamw"].param_groups} == {0.1, 0.0}
    # Muon's learning rate is the schedule's times MUON_LR_SCALE, AdamW's the schedule's
    assert [g["lr_scale"] for g in opt.optimizers["muon"].param_groups] == [MUON_LR_SCALE]
    assert all("lr_scale" not in g for g in opt.optimizers["adamw"].param_groups)
    other = make_optimizer(model, TrainConfig(n_tokens=1, optimizer="muon", muon_lr_scale=2.5), 1e-3)
    assert [g["lr_scale"] for g in other.optimizers["muon"].param_groups] == [2.5]


@pytest.mark.parametrize("nesterov, adjust", [(True, "match_rms_adamw"), (False, "match_rms_adamw"),
                                              (True, None), (True, "original")])
def test_batched_muon_updates_exactly_as_torchs_muon(nesterov, adjust):
    """Same-shape matrices orthogonalised together (a matrix beside its transpose; a large one alone, as torch does)
    give torch.optim.Muon's parameters bit for bit, step after step; the state resumes across both ways."""
    torch.manual_seed(0)
    shapes = [(24, 24)] * 4 + [(72, 24), (72, 24), (24, 72), (40, 16)] + [(1024, BATCH_MAX_ELEMENTS // 1024 + 1)] * 2
    start = [torch.randn(s) for s in shapes]
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov, adjust_lr_fn=adjust)

    def steps(optimizers, params, n):
        for _ in range(n):
            grads = [torch.randn(s) for s in shapes]
            for ps in params:
                for p, g in zip(ps, grads, strict=True):
                    p.grad = g.clone()
            for o in optimizers:
                o.step()
            for same in zip(*params, strict=True):
                assert all(torch.equal(same[0], p) for p in same[1:])

    theirs, ours = [p.clone().requires_grad_() for p in start], [p.clone().requires_grad_() for p in start]
    reference, batched = torch.optim.Muon(theirs, **kw), BatchedMuon(ours, **kw)
    steps([reference, batched], [theirs, ours], 3)
    assert not torch.equal(theirs[0], start[0])
    # a checkpoint written by either resumes in the other
    a, b = [p.detach().clone().requires_grad_() for p in theirs], [p.detach().clone().requires_grad_() for p in ours]
    from_torch, from_batched = BatchedMuon(a, **kw), torch.optim.Muon(b, **kw)
    from_torch.load_state_dict(copy.deepcopy(reference.state_dict()))  # as from a file: buffers of its own
    from_batched.load_state_dict(copy.deepcopy(batched.state_dict()))
    steps([reference, batched, from_torch, from_batched], [theirs, ours, a, b], 2)


def test_muon_is_the_default_and_runs_from_before_it_stay_adamw():
    assert TrainConfig(n_tokens=1).optimizer == "muon" and AutopilotConfig().optimizer == "muon"
    assert TrainConfig.from_dict({"n_tokens": 1}).optimizer == "adamw"  # a config.json written before Muon
    assert TrainConfig.from_dict({"n_tokens": 1, "optimizer": "muon"}).optimizer == "muon"
    assert TrainConfig(n_tokens=1).muon_lr_scale == MUON_LR_SCALE == 4.0
    assert TrainConfig.from_dict({"n_tokens": 1, "optimizer": "muon"}).muon_lr_scale == 1.0  # before the scale


def test_a_sweep_designed_before_muon_trains_its_missing_runs_with_adamw(tmp_path):
    import json

    from flopwise.sweep.design import SWEEP_VERSION, read_design
    old = {"version": SWEEP_VERSION, "runs": [], "train_options": {"seed": 0}}
    (tmp_path / "sweep.json").write_text(json.dumps(old))
    _, meta = read_design(tmp_path)
    assert meta["train_options"] == {"seed": 0, "optimizer": "adamw"}
    assert TrainConfig(n_tokens=1, **meta["train_options"]).optimizer == "adamw"  # as runner.run_one builds it
    old["train_options"]["optimizer"] = "muon"  # a Muon sweep from before the scale: its missing runs at 1x
    (tmp_path / "sweep.json").write_text(json.dumps(old))
    assert read_design(tmp_path)[1]["train_options"]["muon_lr_scale"] == 1.0


def test_lora_adapters_are_not_given_to_muon():
    model = Llama(ModelConfig(vocab_size=96, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64, seq_len=16))
    apply_lora(model, 4, 16.0, list(HIDDEN))
    groups = param_groups(model, "muon")
    assert not groups["muon"] and groups["adamw_decay"]  # frozen base weights; adapters stay on AdamW


def test_a_checkpoint_of_another_optimizer_is_refused_with_the_fix():
    model = Llama(ModelConfig(vocab_size=96, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64, seq_len=16))
    adamw = make_optimizer(model, TrainConfig(n_tokens=1, optimizer="adamw"), 1e-3).state_dict()
    muon = make_optimizer(model, TrainConfig(n_tokens=1, optimizer="muon"), 1e-3)
    with pytest.raises(FlopwiseError, match="train it with the optimizer it started with"):
        muon.load_state_dict(adamw)
    legacy = make_optimizer(model, TrainConfig(n_tokens=1, optimizer="adamw"), 1e-3)  # from before Muon: one AdamW
    legacy.load_state_dict(adamw["adamw"])
    with pytest.raises(FlopwiseError, match="--optimizer must be adamw or muon"):
        TrainConfig(n_tokens=1, optimizer="sgd").check()
