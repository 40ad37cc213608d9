"""The named recipes: the literature's numbers, plans offline with the token budget, and end to end
offline on local copies shaped like their hub corpora and tokenizers (model and batch shrunk)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from llmtrain.cli import compose
from llmtrain.data.budget import CorpusSize, epochs, epochs_warning

import recipe_fixtures as fx
from conftest import REPO, tiny_overrides, torchrun_env

# Each recipe's numbers as its source states them (the YAML files cite where each comes from).
RECIPES = {
    "gpt2_124m_adamw": dict(  # llm.c scripts/run_gpt2_124M.sh
        model="gpt2_124m", data_path="HuggingFaceFW/fineweb-edu", data_name="sample-10BT", tokenizer="gpt2",
        lr=6e-4, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1, warmup=700, min_lr_ratio=0.0, clip=1.0,
        tokens_per_step=524_288, seq_len=1024, max_steps=18_865, pad=64, vocab=50_304, strategy="zero1"),
    "llama7b_adamw": dict(  # Touvron et al. 2023, section 2.2 and table 1
        model="llama2_7b", data_path="cerebras/SlimPajama-627B", data_name=None, tokenizer="meta-llama/Llama-2-7b-hf",
        lr=3e-4, betas=[0.9, 0.95], eps=1e-5, weight_decay=0.1, warmup=2000, min_lr_ratio=0.1, clip=1.0,
        tokens_per_step=4_194_304, seq_len=4096, max_steps=476_837, pad=0, vocab=32_000, strategy="fsdp"),
    "llama3_8b_adamw": dict(  # Grattafiori et al. 2024, table 3 and section 3.4.1
        model="llama3_8b", data_path="HuggingFaceFW/fineweb", data_name=None, tokenizer="meta-llama/Meta-Llama-3-8B",
        lr=3e-4, betas=[0.9, 0.95], eps=1e-5, weight_decay=0.1, warmup=8000, min_lr_ratio=0.01, clip=1.0,
        tokens_per_step=8_388_608, seq_len=8192, max_steps=1_788_139, pad=0, vocab=128_256, strategy="fsdp"),
}
# Planned tokens: gpt2 ~10B (llm.c), LLaMA-2 2.0T (table 1), Llama-3 15T (model card).
PLANNED_TOKENS = {"gpt2_124m_adamw": 9.9e9, "llama7b_adamw": 2.0e12, "llama3_8b_adamw": 15e12}
WORLD = {"gpt2_124m_adamw": 8, "llama7b_adamw": 64, "llama3_8b_adamw": 64}
TOKENIZERS = {"gpt2_124m_adamw": fx.gpt2_like_tokenizer, "llama7b_adamw": fx.llama2_like_tokenizer,
              "llama3_8b_adamw": fx.llama3_like_tokenizer}
CORPUS = {"gpt2_124m_adamw": "fineweb_edu", "llama7b_adamw": "slimpajama", "llama3_8b_adamw": "fineweb"}


def offline_env() -> dict[str, str]:
    return dict(torchrun_env(), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


def run_cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmtrain", *args], cwd=cwd, env=offline_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_numbers_are_the_literatures(name):
    want = RECIPES[name]
    cfg = compose([f"+experiment={name}"])
    (source,) = cfg.data.sources
    assert (cfg.model.name, source["path"], source.get("name"), cfg.data.tokenizer) == (
        want["model"], want["data_path"], want["data_name"], want["tokenizer"])
    assert source["type"] == "hf" and source["text_field"] == "text"
    o, s, t = cfg.optim, cfg.schedule, cfg.train
    assert (o["name"], o["lr"], list(o["betas"]), o["eps"], o["weight_decay"]) == (
        "adamw", want["lr"], want["betas"], want["eps"], want["weight_decay"])
    assert (s.name, s.warmup_steps, s.min_lr_ratio, t.grad_clip) == ("cosine", want["warmup"], want["min_lr_ratio"],
                                                                    want["clip"])
    assert (t.global_batch_size * t.seq_len, t.seq_len, t.max_steps) == (
        want["tokens_per_step"], want["seq_len"], want["max_steps"])
    assert (cfg.data.pad_vocab_to_multiple_of, cfg.model.vocab_size) == (want["pad"], want["vocab"])
    assert cfg.distributed.strategy == want["strategy"]
    assert math.isclose(t.max_steps * want["tokens_per_step"], PLANNED_TOKENS[name], rel_tol=0.02)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_plans_offline_with_its_token_budget(name, tmp_path):
    run = tmp_path / "plan"
    proc = run_cli([f"+experiment={name}", "dry_run=true", f"distributed.world_size={WORLD[name]}",
                    "plan.gpu=h100_sxm_80gb", f"run_dir={run}", f"data.cache_dir={tmp_path / 'cache'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads((run / "plan.json").read_text())
    want = RECIPES[name]
    assert plan["throughput"]["tokens_per_step"] == want["tokens_per_step"]
    assert plan["fits"], plan["memory_per_gpu"]
    budget = plan["token_budget"]
    assert budget["train_split_tokens_source"] == "estimated from data.sources[].tokens"
    assert budget["planned_tokens"] == want["tokens_per_step"] * want["max_steps"]
    source_tokens = {"gpt2_124m_adamw": 10e9, "llama7b_adamw": 627e9, "llama3_8b_adamw": 15e12}[name]
    val = compose([f"+experiment={name}"]).data.val_fraction
    assert plan["epochs"] == pytest.approx(budget["planned_tokens"] / (source_tokens * (1 - val)))
    assert f"{plan['epochs']:,.2f} epochs" in proc.stdout
    assert not (tmp_path / "cache").exists()  # planning prepared nothing


def test_epochs_by_hand_and_the_warning_above_four():
    size = CorpusSize(["a", "b"], [1000.0, 3000.0], exact=True)
    natural = epochs(8000, size, None)
    assert natural["epochs"] == 2.0 and natural["epochs_per_source"] == {"a": 2.0, "b": 2.0}
    assert epochs_warning(natural) is None
    weighted = epochs(8000, size, [3.0, 1.0])  # a gets 6000 of 8000 tokens: 6 passes over its 1000
    assert weighted["epochs_per_source"] == {"a": 6.0, "b": 8000 * 0.25 / 3000}
    line = epochs_warning(weighted)
    assert line.startswith("warning:") and "6.0 epochs of a's training split" in line and "\n" not in line
    assert "4,400 tokens is 4.4 epochs" in epochs_warning(epochs(4400, CorpusSize(["a"], [1000.0], True), None))


def test_dry_run_warns_above_four_epochs_and_counts_the_prepared_split(corpus, data_cache, tmp_path, capsys):
    from llmtrain.data.prepare import load_meta, prepare
    from llmtrain.plan import run_dry_run

    args = tiny_overrides(corpus, data_cache, tmp_path / "run", **{"train.max_steps": 400})
    cfg = compose(args)
    train_tokens = sum(s["splits"]["train"]["tokens"] for s in load_meta(prepare(cfg.data, progress=False))["sources"])
    p = run_dry_run(cfg, str(tmp_path / "run"))
    planned = 400 * 8 * 32
    assert p["token_budget"]["train_split_tokens_source"] == "prepared"
    assert p["epochs"] == pytest.approx(planned / train_tokens)
    assert p["epochs"] > 4
    err = capsys.readouterr().err
    assert f"is {planned / train_tokens:,.1f} epochs of the {train_tokens:,}-token training split;" in err


def test_dry_run_without_a_known_size_says_why(tmp_path):
    from llmtrain.plan import plan

    cfg = compose([f"data.sources=[{{path: some/dataset, type: hf}}]", f"data.cache_dir={tmp_path}"])
    p = plan(cfg)
    assert p["epochs"] is None and p["token_budget"] is None
    assert any("size is unknown until the data is prepared" in n for n in p["notes"])


def test_trainer_start_up_warns_above_four_epochs(corpus, data_cache, tmp_path, capsys):
    from llmtrain.trainer import Trainer

    cfg = compose(tiny_overrides(corpus, data_cache, tmp_path / "run", **{"train.max_steps": 400}))
    trainer = Trainer(cfg, tmp_path / "run")
    try:
        assert trainer.token_budget["epochs"] > 4
    finally:
        trainer.close()
    out = capsys.readouterr()
    assert "epochs of the" in out.out + out.err and "repeated data stops helping" in out.out + out.err


def test_a_source_size_must_be_a_positive_number():
    from llmtrain.data.sources import resolve_sources
    from llmtrain.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.sources\[0\].tokens: got 'many'"):
        resolve_sources([{"path": "org/name", "type": "hf", "tokens": "many"}])


@pytest.mark.slow
def test_offline_training_names_the_tokenizer_then_the_dataset(tmp_path):
    shrink = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "train.max_steps=1", "train.seq_len=16",
              "train.global_batch_size=2", "train.micro_batch_size=2", f"data.cache_dir={tmp_path / 'cache'}"]
    proc = run_cli(["+experiment=gpt2_124m_adamw", *shrink, f"run_dir={tmp_path / 'a'}"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: data.tokenizer: cannot load 'gpt2'") and "data.tokenizer=PATH" in line
    tok = fx.gpt2_like_tokenizer(tmp_path / "tok")
    proc = run_cli(["+experiment=gpt2_124m_adamw", *shrink, f"data.tokenizer={tok}", f"run_dir={tmp_path / 'b'}"],
                   tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert line.startswith("error: HuggingFaceFW/fineweb-edu: cannot stream") and "data.sources=" in line
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_trains_evaluates_and_resumes_on_local_copies(name, tmp_path):
    corpus = fx.parquet_corpus(tmp_path / CORPUS[name], CORPUS[name])
    tok = TOKENIZERS[name](tmp_path / "tokenizer")
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tok / "tokenizer.json")).get_vocab_size()
    run = tmp_path / "run"
    args = [f"+experiment={name}", f"data.sources=[{{path: '{corpus}', text_field: text}}]", f"data.tokenizer={tok}",
            f"data.cache_dir={tmp_path / 'cache'}", "data.num_proc=1", "data.val_fraction=0.1",
            "model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.max_seq_len=64",
            "model.activation_checkpointing=none", "train.seq_len=32", "train.global_batch_size=4",
            "train.micro_batch_size=2", "train.precision=fp32", "train.eval_every=2", "train.eval_steps=2",
            "train.save_every=2", "train.log_every=1", "train.progress_bar=false", "train.sample_tokens=0",
            "schedule.warmup_steps=1", "logger.plot=false", f"run_dir={run}"]
    if RECIPES[name]["pad"] == 0:
        args.append(f"model.vocab_size={vocab}")
    if name != "gpt2_124m_adamw":  # LLaMA-2 7B: as many key/value heads as heads; Llama-3: grouped, 8 of 32
        args.append(f"model.n_kv_heads={4 if name == 'llama7b_adamw' else 2}")
    first = run_cli([*args, "train.max_steps=4"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(math.isfinite(r["val_loss"]) for r in evals)
    assert all(0 < r["val_bpb"] < r["val_loss"] for r in evals)  # a few bytes a token: fewer bits per byte than nats
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["status"] == "completed"
    assert summary["final_val_bpb"] == evals[-1]["val_bpb"]
    assert summary["epochs_planned"] == pytest.approx(4 * 4 * 32 / sum(
        s["splits"]["train"]["tokens"] for s in json.loads(next((tmp_path / "cache").glob("*/meta.json")).read_text())[
            "sources"]))
    expected_vocab = -(-vocab // 64) * 64 if RECIPES[name]["pad"] else vocab
    assert json.loads(json.dumps(__import__("yaml").safe_load((run / "config.yaml").read_text())))["model"][
        "vocab_size"] == expected_vocab
    second = run_cli([*args, "train.max_steps=6"], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout + second.stderr
    assert "config change on resume: train.max_steps 4 -> 6" in second.stdout + second.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["status"] == "completed"
    steps = [json.loads(line).get("step") for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(5) >= 1 and steps.count(3) == 1  # steps 1-4 were not trained again
