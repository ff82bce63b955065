"""The trainer's allocator setting: a block freed by one step is reused by the next, not faulted in anew."""

import json
import subprocess
import sys

import pytest

FAULTS = r"""
import json, resource, sys, torch
from flopwise.model.llama import Llama, ModelConfig
from flopwise.training.malloc import keep_freed_memory
set_ = sys.argv[1] == "set" and keep_freed_memory()
torch.manual_seed(0)
model = Llama(ModelConfig(vocab_size=1024, d_model=16, n_layers=2, n_heads=1, n_kv_heads=1, d_ff=48, seq_len=128))
opt = torch.optim.AdamW(model.parameters())
x = torch.randint(0, 1024, (8, 129))
faults = []
for _ in range(12):  # training steps of a sweep-sized model: 4 MB of logits and their gradient each
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model(x[:, :-1], x[:, 1:]).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"set": set_, "faults": sorted(faults[2:])[len(faults[2:]) // 2]}))
"""


def _median_faults(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_freed_blocks_are_reused_without_page_faults():
    kept = _median_faults("set")
    if not kept["set"]:
        pytest.skip("not glibc: the allocator is left as it is")
    plain = _median_faults("plain")
    assert plain["faults"] >= 500  # glibc as it starts: a 4 MB block faulted in anew each step (1,025 here)
    assert kept["faults"] <= 10
