"""W&B modes, run names and groups, the multirun job header, and the loss plot."""

from __future__ import annotations

import json
import sys
import types

import pytest

from llmtrain.cli import compose
from llmtrain.config import LoggerConfig, WandbConfig
from llmtrain.errors import ConfigError
from llmtrain.logging import RunLogger, job_header, run_name, sweep_shape, wandb_logged_in, wandb_mode
from llmtrain.trainer import Trainer

from conftest import tiny_overrides


def test_wandb_auto_is_offline_without_credentials(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not wandb_logged_in()
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password x\n")
    assert wandb_logged_in()
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert wandb_logged_in()


@pytest.mark.slow
def test_wandb_offline_run_logs_and_resumes_same_id(corpus, data_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    run = tmp_path / "run"
    extra = {"logger.wandb.mode": "auto", "train.max_steps": 4, "train.eval_every": 2, "train.save_every": 2}
    summary = Trainer(compose(tiny_overrides(corpus, data_cache, run, **extra)), run).fit()
    assert summary["status"] == "completed"
    assert "wandb sync" in capsys.readouterr().out
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb"))
    run_id = offline[0].name.rsplit("-", 1)[-1]
    state_id = __import__("torch").load(run / "checkpoints" / "step_4" / "trainer.pt", weights_only=True)["wandb_run_id"]
    assert state_id == run_id
    # Resuming continues the same W&B run.
    extra["train.max_steps"] = 6
    Trainer(compose(tiny_overrides(corpus, data_cache, run, **extra)), run).fit()
    assert {p.name.rsplit("-", 1)[-1] for p in (run / "wandb").glob("offline-run-*")} == {run_id}


def test_loss_plot_written_at_eval(corpus, data_cache, tmp_path):
    run = tmp_path / "run"
    extra = {"logger.plot": "true", "train.max_steps": 4, "train.eval_every": 2}
    Trainer(compose(tiny_overrides(corpus, data_cache, run, **extra)), run).fit()
    png = (run / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4]


class FakeWandb(types.ModuleType):
    """A stand-in ``wandb`` module that records ``init``'s arguments: no network, no files."""

    def __init__(self):
        super().__init__("wandb")
        self.inits: list[dict] = []
        self.Settings = dict

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return types.SimpleNamespace(id="fake1", summary={}, log=lambda row, step=None: None, finish=lambda: None)


CONFIG = {"model": {"name": "llama_tiny"}, "optim": {"name": "adamw", "lr": 3e-3}, "experiment": None}


def _run_logger(tmp_path, config=CONFIG, **wandb_cfg) -> RunLogger:
    cfg = LoggerConfig(wandb=WandbConfig(**wandb_cfg), plot=False)
    return RunLogger(tmp_path, cfg, config, enabled=True, total_steps=2, start_step=0, progress=False)


@pytest.fixture
def fake_wandb(monkeypatch, tmp_path) -> FakeWandb:
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for var in ("WANDB_MODE", "WANDB_DISABLED", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    return fake


@pytest.mark.parametrize("env_mode, logged_in, expected", [
    ("offline", True, "offline"), ("online", False, "online"), ("dryrun", True, "offline"),
    (None, True, "online"), (None, False, "offline"), ("", False, "offline"),
])
def test_wandb_auto_mode_follows_WANDB_MODE(fake_wandb, tmp_path, monkeypatch, env_mode, logged_in, expected):
    if env_mode is not None:
        monkeypatch.setenv("WANDB_MODE", env_mode)
    if logged_in:
        monkeypatch.setenv("WANDB_API_KEY", "k")
    log = _run_logger(tmp_path, mode="auto")
    assert [init["mode"] for init in fake_wandb.inits] == [expected]
    log.close({})


@pytest.mark.parametrize("var, value", [("WANDB_MODE", "disabled"), ("WANDB_MODE", "Disabled"),
                                        ("WANDB_DISABLED", "true")])
def test_wandb_disabled_in_the_environment_never_imports_wandb(tmp_path, monkeypatch, var, value):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` now raises ImportError
    monkeypatch.setenv("WANDB_API_KEY", "k")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv(var, value)
    log = _run_logger(tmp_path, mode="auto")
    assert log.wandb is None and log.wandb_run_id is None
    log.close({})


def test_wandb_mode_set_in_the_config_wins_and_a_bad_env_value_is_one_line(fake_wandb, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    _run_logger(tmp_path, mode="offline").close({})
    assert fake_wandb.inits[-1]["mode"] == "offline"
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    assert wandb_mode("disabled") == "disabled"
    with pytest.raises(ConfigError, match=r"^WANDB_MODE: got 'sometimes', expected one of: online, offline"):
        _run_logger(tmp_path, mode="auto")


def test_wandb_run_named_after_experiment_or_model_and_optimizer(fake_wandb, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    _run_logger(tmp_path, mode="auto").close({})
    _run_logger(tmp_path, {**CONFIG, "experiment": "gpt2_124m_adamw"}, mode="auto").close({})
    _run_logger(tmp_path, mode="auto", name="mine", group="ablation").close({})
    assert [(i["name"], i["group"]) for i in fake_wandb.inits] == [
        ("llama_tiny_adamw", None), ("gpt2_124m_adamw", None), ("mine", "ablation")]


def test_run_name_lists_the_overrides_that_describe_the_run():
    experiment = {**CONFIG, "experiment": "gpt2_124m_adamw"}
    overrides = ["+experiment=gpt2_124m_adamw", "++optim.lr=3e-4", "run_dir=/scratch/x", "logger.wandb.mode=online",
                 "data.cache_dir=/scratch/cache", "hydra.sweep.dir=/s", "~optim.eps",
                 "data.sources=[{path:'/datasets/fineweb-edu/sample-10BT/*.jsonl'}]"]
    assert run_name(experiment, overrides) == (
        "gpt2_124m_adamw optim.lr=3e-4 ~optim.eps data.sources=…eweb-edu/sample-10BT/*.jsonl'}]")
    lion = {**CONFIG, "optim": {"name": "lion"}}
    assert run_name(lion, ["optim=lion", "model=llama_tiny", "optim.lr=1e-4"]) == "llama_tiny_lion optim.lr=1e-4"
    assert run_name(experiment, ["optim=lion"]) == "gpt2_124m_adamw optim=lion"
    long = run_name(CONFIG, [f"optim.k{i}={i}" for i in range(40)])
    assert len(long) == 128 and long.endswith("…")


def test_job_header_shows_the_swept_overrides():
    task = ["++optim.lr=1e-3", "optim=lion", "train.max_steps=100"]
    assert job_header(1, 6, task, ["optim", "optim.lr"]) == "[job 2/6] optim.lr=1e-3 optim=lion"
    assert job_header(0, 1, task, []) == "[job 1/1] optim.lr=1e-3 optim=lion train.max_steps=100"
    assert job_header(3, None, task, ["optim"]) == "[job 4] optim=lion"
    sweep = ["optim=adamw,lion,muon", "optim.lr=1e-3,3e-3", "train.max_steps=10"]
    assert sweep_shape(sweep) == (6, ["optim", "optim.lr"])
    assert sweep_shape(["++optim.lr=range(1,4)", "optim=lion"]) == (3, ["optim.lr"])
    assert sweep_shape(["optim=glob(*)"]) == (None, [])
