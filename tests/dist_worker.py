"""A small training loop over llmtrain.distributed / checkpoint / optim.sharded, run under torchrun
by tests/test_distributed_unit.py. It mirrors the trainer's step (accumulation with grad_sync,
clip_grad_norm_, owner-rank optimizer wrapper) on a tiny LLaMA and fixed random tokens, so the
strategies can be compared with one process without the data pipeline.

    torchrun --nproc_per_node=2 tests/dist_worker.py '{"strategy": "fsdp", "optim": "adamw", ...}'

Writes {"losses": [...], "state_bytes": int, "world_size": int} to ``out`` (rank 0).
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

from llmtrain import checkpoint
from llmtrain.distributed import all_reduce_mean, barrier, grad_sync, init_distributed, parallelize, shutdown, unwrap
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


def batches(step: int, global_batch: int, seq_len: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    data = torch.randint(0, vocab, (global_batch, seq_len + 1), generator=g)
    return data[:, :-1], data[:, 1:]


def main(spec: dict) -> None:
    env = init_distributed("cpu", spec["strategy"], 120)

    class Options:
        gpus_per_node = spec.get("gpus_per_node", 8)
        grad_compression = "none"

    torch.manual_seed(0)
    mcfg = ModelConfig(family="llama", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, vocab_size=128,
                       max_seq_len=32, ffn_hidden=128, activation_checkpointing=spec.get("ac", "none"))
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
    losses = []
    for step in range(start, spec["steps"]):
        x, y = batches(step, gb, 32, 128)
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
        if spec.get("save_at") == step + 1:
            trainer_state = {"step": step + 1}
            if env.world_size > 1:
                checkpoint.save_sharded_checkpoint(spec["run_dir"], step + 1, unwrap(model), optimizer, trainer_state, env)
            else:
                checkpoint.save_checkpoint(spec["run_dir"], step + 1, unwrap(model).state_dict(), optimizer.state_dict(), trainer_state)
    barrier(env)
    if env.is_main:
        with open(spec["out"], "w") as f:
            json.dump({"losses": losses, "state_bytes": state_bytes(optimizer), "world_size": env.world_size,
                       "strategy": env.strategy}, f)
    shutdown(env)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
