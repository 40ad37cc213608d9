"""Bad input gets one line naming the key, exit code 2, and no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llmtrain.cli import compose
from llmtrain.errors import ConfigError

from conftest import REPO

BAD = [
    (["train.max_stepz=10"], "train.max_stepz", "max_steps"),                    # unknown key, lists the known ones
    (["+train.max_step=5"], "train.max_step", "max_steps"),                       # appended: refused the same way
    (["+model.n_layer=2"], "model.n_layer", "n_layers"),
    (["+foo=1"], "foo", "train"),
    (["train.device=gpu"], "train.device", "cuda:N"),
    (["train.max_steps=ten"], "train.max_steps", "ten"),                          # wrong type
    (["schedule.name=cosin"], "schedule.name", "cosine"),                         # outside its set
    (["train.global_batch_size=10", "train.micro_batch_size=4"], "train.global_batch_size", "multiple of 4"),
    (["data.sources=[{path:/no/such/file.txt}]"], "data.sources[0].path", "/no/such/file.txt"),
    (["optim=adamx"], "optim", "adamw"),                                          # unknown config group option
    (["optim.betaz=[0.9,0.95]"], "optim.betaz", "betas"),                          # not a hyperparameter of adamw
    (["train.precision=fp8"], "train.precision", "bf16"),
    (["train.cpu_matmul=mkl"], "train.cpu_matmul", "onednn"),
    (["distributed.strategy=zero4"], "distributed.strategy", "fsdp"),
    (["model.n_heads=7"], "model.n_heads", "d_model"),
    (["resume=/no/such/ckpt"], "resume", "/no/such/ckpt"),
]


@pytest.mark.parametrize("overrides,key,hint", BAD, ids=[b[1] for b in BAD])
def test_compose_rejects(overrides, key, hint):
    with pytest.raises(ConfigError) as info:
        compose(overrides)
    assert info.value.key == key
    assert hint in str(info.value)
    assert "\n" not in str(info.value)


def _run(args):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "llmtrain", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,key", [
    (["schedule.name=cosin"], "schedule.name"),
    (["train.foo=1"], "train.foo"),
    (["+train.max_step=5"], "train.max_step"),
    (["-m", "optim=adamw,adamx"], "optim"),
    (["train.global_batch_size=10", "train.micro_batch_size=4"], "train.global_batch_size"),
])
def test_cli_exit_2_one_line(args, key):
    result = _run(args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {key}")
    assert "Traceback" not in result.stderr


def test_7b_on_a_small_machine_is_a_memory_message_not_an_oom():
    result = _run(["+experiment=llama7b_adamw", "logger.wandb.mode=disabled"])
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: model: llama2_7b needs ~")
    assert "dry_run=true" in lines[0] and "more GPUs" in lines[0]


def test_dry_run_writes_plan(tmp_path):
    result = _run(["+experiment=llama7b_adamw", "dry_run=true", f"run_dir={tmp_path}"])
    assert result.returncode == 0, result.stderr
    import json

    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["params"]["total"] == 6_738_415_616
    assert "6.74B" in result.stdout


def test_no_validation_split_with_eval_is_an_error():
    with pytest.raises(ConfigError, match="data.val_fraction"):
        compose(["data.val_fraction=0"])
    compose(["data.val_fraction=0", "train.eval_every=0"])


def test_user_errors_survive_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(ConfigError("optim.lr", "bad")))
    assert isinstance(err, ConfigError) and err.key == "optim.lr" and str(err) == "optim.lr: bad"


def test_impl_names_are_checked_per_optimizer():
    """`optim.impl=bnb` is adamw8bit's (bitsandbytes) path: it composes for adamw8bit and is a
    one-line error for an optimizer without it."""
    assert compose(["optim=adamw8bit", "optim.impl=bnb"]).optim["impl"] == "bnb"
    with pytest.raises(ConfigError, match=r"^optim\.impl: got 'fast'") as info:
        compose(["optim=adamw8bit", "optim.impl=fast"])
    assert "bnb" in str(info.value)
