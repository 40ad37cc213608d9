"""A small training loop over llmtrain.distributed / checkpoint / optim.sharded, run under torchrun
by tests/test_distributed_unit.py. It mirrors the trainer's step (accumulation with grad_sync,
clip_grad_norm_, owner-rank optimizer wrapper) on a tiny LLaMA and fixed random tokens, so the
strategies can be compared with one process without the data pipeline.

    torchrun --nproc_per_node=2 tests/dist_worker.py '{"strategy": "fsdp", "optim": "adamw", ...}'

Writes {"losses": [...], "state_bytes": int, "state_bytes_per_rank": [...], "world_size": int} to
``out`` (rank 0). ``spec["model"]`` overrides fields of the tiny LLaMA (a large vocab makes the tied
embedding most of the model).
"""

from __future__ import annotations

import dataclasses
import json
import sys

import torch
import torch.nn.functional as F

from llmtrain import checkpoint
from llmtrain.distributed import (
    all_gather_objects, all_reduce_mean, barrier, comm_bytes, exit_torchrun_worker, grad_sync, init_distributed,
    parallelize, shutdown, unwrap,
)
from llmtrain.models import build_model
from llmtrain.models.config import ModelConfig
from llmtrain.optim import OPTIMIZERS, build_optimizer
from llmtrain.optim.protocol import state_bytes
from llmtrain.optim.sharded import shard_optimizer


class ToyMuon(torch.optim.Optimizer):
    """Momentum + Newton-Schulz orthogonalised update on matrices (Muon's maths), AdamW-free:
    the non-matrix group takes plain SGD. Stands in for a matrix optimizer in these tests."""

    hybrid_flag = "use_muon"

    def __init__(self, params, lr=0.02, momentum=0.95, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @staticmethod
    def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
        a, b, c = 3.4445, -4.7750, 2.0315
        x = g / (g.norm() + 1e-7)
        tall = x.size(0) > x.size(1)
        if tall:
            x = x.T
        for _ in range(steps):
            s = x @ x.T
            x = a * x + (b * s + c * s @ s) @ x
        return x.T if tall else x

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group.get("use_muon"):
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                    buf.mul_(group["momentum"]).add_(p.grad)
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(self.orthogonalize(buf), alpha=-group["lr"])
                else:
                    p.add_(p.grad, alpha=-group["lr"])


OPTIMIZERS.setdefault("toy_muon", ToyMuon)


def batches(step: int, global_batch: int, seq_len: int, vocab: int,
            learnable: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens, or (learnable) counting sequences start, start+1, ... mod vocab."""
    g = torch.Generator().manual_seed(1000 + step)
    if learnable:
        start = torch.randint(0, vocab, (global_batch, 1), generator=g)
        data = (start + torch.arange(seq_len + 1)) % vocab
    else:
        data = torch.randint(0, vocab, (global_batch, seq_len + 1), generator=g)
    return data[:, :-1], data[:, 1:]


def model_config(spec: dict, **extra) -> ModelConfig:
    fields = dict(family="llama", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=32,
                  ffn_hidden=128, **extra)
    fields.update(spec.get("model", {}))
    return ModelConfig(**fields)


def main(spec: dict) -> None:
    env = init_distributed("cpu", spec["strategy"], 120)

    class Options:
        gpus_per_node = spec.get("gpus_per_node", 8)
        grad_compression = spec.get("grad_compression", "none")
        powersgd_rank = spec.get("powersgd_rank", 4)

    torch.manual_seed(0)
    mcfg = model_config(spec, activation_checkpointing=spec.get("ac", "none"))
    vocab = mcfg.vocab_size
    model = build_model(mcfg)
    model = parallelize(model, env, compile=spec.get("compile", False), options=Options)
    optim_cfg = {"name": spec["optim"], "lr": spec.get("lr", 3e-3), **spec.get("optim_kwargs", {})}
    optimizer = shard_optimizer(build_optimizer(optim_cfg, unwrap(model)), env, spec["optim"])
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])

    start = 0
    if spec.get("resume"):
        state = checkpoint.restore(spec["resume"], unwrap(model), optimizer)
        start = state["step"]

    gb, micro = spec.get("global_batch", 8), spec.get("micro_batch", 2)
    per_rank = gb // env.world_size
    accum = per_rank // micro
    losses, comm = [], []
    for step in range(start, spec["steps"]):
        x, y = batches(step, gb, 32, vocab, spec.get("learnable", False))
        x, y = x[env.rank * per_rank:(env.rank + 1) * per_rank], y[env.rank * per_rank:(env.rank + 1) * per_rank]
        total = torch.zeros(())
        for i in range(accum):
            xs, ys = x[i * micro:(i + 1) * micro], y[i * micro:(i + 1) * micro]
            with grad_sync(model, enabled=i == accum - 1):
                logits = model(xs)
                loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), ys.reshape(-1)) / accum
                loss.backward()
            total += loss.detach()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), spec.get("clip", 1.0))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(all_reduce_mean(total, env)))
        sent = comm_bytes(model)
        if sent is not None:
            comm.append(sent)
        if spec.get("save_at") == step + 1:
            trainer_state = {"step": step + 1}
            if env.world_size > 1:
                checkpoint.save_sharded_checkpoint(spec["run_dir"], step + 1, unwrap(model), optimizer, trainer_state, env)
            else:
                checkpoint.save_checkpoint(spec["run_dir"], step + 1, unwrap(model).state_dict(), optimizer.state_dict(), trainer_state)
    per_rank_bytes = all_gather_objects(state_bytes(optimizer), env)
    barrier(env)
    if env.is_main:
        with open(spec["out"], "w") as f:
            json.dump({"losses": losses, "state_bytes": state_bytes(optimizer), "state_bytes_per_rank": per_rank_bytes,
                       "world_size": env.world_size, "strategy": env.strategy, "comm_bytes": comm,
                       "grad_numel": sum(p.numel() for p in unwrap(model).parameters())}, f)
    shutdown(env)


def optim_config(name: str) -> dict:
    """configs/optim/<name>.yaml, the preset users get with ``optim=<name>``."""
    from pathlib import Path

    from omegaconf import OmegaConf

    path = Path(__file__).resolve().parent.parent / "configs" / "optim" / f"{name}.yaml"
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True) if path.is_file() else {"name": name, "lr": 1e-3}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}


def run_steps(model, optimizer, micro_batches_per_step, steps: int, env, sync: bool) -> list[float]:
    """The trainer's step: accumulate with grad_sync, clip, hooks, closure or owned backward."""
    from llmtrain.optim.protocol import StepContext

    def forward(x):
        return model(x)

    def forward_backward(micro):
        total = torch.zeros(())
        for i, (x, y) in enumerate(micro):
            with grad_sync(model, enabled=(i == len(micro) - 1) or not sync):
                logits = forward(x)
                loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1)) / len(micro)
                if getattr(optimizer, "owns_backward", False):
                    optimizer.backward(loss)
                else:
                    loss.backward()
            total += loss.detach()
        return total

    def clip():
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    losses = []
    for step in range(steps):
        micro = micro_batches_per_step(step)
        loss = forward_backward(micro)
        if not getattr(optimizer, "owns_backward", False):
            clip()
            ctx = StepContext(model, micro, forward, step)
            if callable(getattr(optimizer, "before_step", None)):
                optimizer.before_step(ctx)
            if getattr(optimizer, "requires_closure", False):
                def closure():
                    optimizer.zero_grad(set_to_none=True)
                    with torch.enable_grad():
                        out = forward_backward(micro)
                    clip()
                    return out
                optimizer.step(closure)
            else:
                optimizer.step()
            if callable(getattr(optimizer, "after_step", None)):
                optimizer.after_step(ctx)
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(all_reduce_mean(loss, env) if sync else loss))
    return losses


def full_params(model) -> dict[str, torch.Tensor]:
    from llmtrain.checkpoint import _param_names

    _param_names(model)  # reshard FSDP roots so named_parameters are the DTensors
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()}


def matrix(spec: dict) -> None:
    """Every optimizer under one strategy vs one process on the same global batch: runs or refuses."""
    from llmtrain.distributed import DistEnv
    from llmtrain.errors import UserError

    env = init_distributed("cpu", spec["strategy"], 120)

    class Options:
        gpus_per_node = spec.get("gpus_per_node", 8)
        grad_compression = "none"

    mcfg = model_config(spec)
    vocab = mcfg.vocab_size
    gb, micro, steps = 8, 2, spec.get("steps", 3)
    per_rank = gb // env.world_size

    def global_micro(step):
        x, y = batches(step, gb, 32, vocab)
        return [(x[i:i + micro], y[i:i + micro]) for i in range(0, gb, micro)]

    def rank_micro(step):
        x, y = batches(step, gb, 32, vocab)
        x, y = x[env.rank * per_rank:(env.rank + 1) * per_rank], y[env.rank * per_rank:(env.rank + 1) * per_rank]
        return [(x[i:i + micro], y[i:i + micro]) for i in range(0, per_rank, micro)]

    results = {}
    for name in spec["optims"]:
        cfg = optim_config(name)
        torch.manual_seed(0)
        ref_model = build_model(mcfg)
        init = {n: p.detach().clone() for n, p in ref_model.named_parameters()}
        torch.manual_seed(0)
        model = build_model(mcfg)
        local = DistEnv(0, 0, 1, torch.device("cpu"), "none")
        ref_opt = build_optimizer(cfg, ref_model)
        torch.manual_seed(1)
        ref_losses = run_steps(ref_model, ref_opt, global_micro, steps, local, sync=False)
        ref_params = {n: p.detach().clone() for n, p in ref_model.named_parameters()}
        # Baseline with the very same gradients (DDP all-reduce): isolates what sharding changes
        # from what reduction order changes (Muon's bf16 Newton-Schulz and SOAP's eigenbases
        # turn 1e-7 gradient differences into visible ones even under plain DDP).
        torch.manual_seed(0)
        ddp_model = parallelize(build_model(mcfg), dataclasses.replace(env, strategy="ddp"), options=Options)
        torch.manual_seed(0)
        model = parallelize(model, env, options=Options)
        try:
            opt = shard_optimizer(build_optimizer(cfg, unwrap(model)), env, name)
            refuse = getattr(opt, "refuse", None)
            reason = refuse(env.strategy, per_rank // micro) if callable(refuse) else None
            if reason:
                raise UserError("optim.name", reason)
        except UserError as err:
            results[name] = {"refused": str(err)}
            continue
        try:
            torch.manual_seed(1)
            ddp_losses = run_steps(ddp_model, build_optimizer(cfg, unwrap(ddp_model)), rank_micro, steps, env, sync=True)
            torch.manual_seed(1)
            got = run_steps(model, opt, rank_micro, steps, env, sync=True)
        except Exception as err:  # recorded so one broken optimizer does not hide the others
            import traceback

            tb = traceback.extract_tb(err.__traceback__)[-1]
            results[name] = {"error": f"{type(err).__name__}: {str(err)[:200]} at {tb.filename}:{tb.lineno}"}
            barrier(env)
            continue
        params, ddp_params = full_params(unwrap(model)), full_params(unwrap(ddp_model))
        results[name] = {
            "loss_diff_vs_one": max(abs(a - b) for a, b in zip(ref_losses, got)),
            "loss_diff_ddp_vs_one": max(abs(a - b) for a, b in zip(ref_losses, ddp_losses)),
            "param_diff_vs_one": max(float((params[n] - ref_params[n]).abs().max()) for n in ref_params),
            "param_diff_vs_ddp": max(float((params[n] - ddp_params[n]).abs().max()) for n in ref_params),
            "update": max(float((ref_params[n] - init[n]).abs().max()) for n in ref_params),
            "state_bytes": state_bytes(opt),
            "state_bytes_per_rank": all_gather_objects(state_bytes(opt), env),
        }
    barrier(env)
    if env.is_main:
        with open(spec["out"], "w") as f:
            json.dump(results, f, indent=1)
    shutdown(env)


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    matrix(spec) if spec.get("mode") == "matrix" else main(spec)
    exit_torchrun_worker()
