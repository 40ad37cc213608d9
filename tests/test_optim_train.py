"""Every issue-6 registry entry trains a tiny LLaMA through build_optimizer and the hook protocol.

Data: token t+1 = perm[token t] for a fixed random permutation, so any learning drives the loss
well below ln(vocab). The loop does what the trainer does: ``group["lr"] = initial_lr * factor``,
``before_step``/``after_step`` hooks with a StepContext, ``step(closure)`` when
``requires_closure``, and ``eval()``/``train()`` around evaluation.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmtrain.models import build_model
from llmtrain.optim import OPTIMIZERS, build_optimizer
from llmtrain.optim.protocol import StepContext, state_bytes

VOCAB, SEQ, BATCH, STEPS = 64, 16, 8, 50

CASES: dict[str, dict] = {
    "sgd": dict(lr=0.5, momentum=0.9),
    "adagrad": dict(lr=0.05),
    "rmsprop": dict(lr=3e-3),
    "adam": dict(lr=1e-2),
    "adamw": dict(lr=1e-2, weight_decay=0.1),
    "adabelief": dict(lr=1e-2),
    "adafactor": dict(lr=0.1, beta1=0.9),
    "lion": dict(lr=2e-3, weight_decay=0.1),
    "lamb": dict(lr=3e-2),
    "lars": dict(lr=20.0),
    "sophia": dict(lr=2e-3, rho=0.05, hess_interval=5),
    "schedulefree_adamw": dict(lr=1e-2),
    "adam_mini": dict(lr=1e-2),
    "muon": dict(lr=0.05, adamw_lr=1e-2),
    "shampoo": dict(lr=1e-2, precondition_frequency=5, start_preconditioning_step=5),
    "soap": dict(lr=1e-2, precondition_frequency=5),
    "galore_adamw": dict(lr=3e-2, rank=8, update_proj_gap=10),
    "sam": dict(lr=1e-2, base="adamw", rho=0.05),
}
ISSUE_6_NAMES = set(CASES) | {"adamw8bit"}  # adamw8bit trains in the kernel engineer's tests


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: one thread avoids oversubscription on shared CPUs (60x slower otherwise)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(dict(name="t", family="llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, multiple_of=16,
                            vocab_size=VOCAB, max_seq_len=SEQ, tie_embeddings=False))


def batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(VOCAB, generator=g)
    while True:
        tokens = torch.empty(BATCH, SEQ + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(VOCAB, (BATCH,), generator=g)
        for t in range(SEQ):
            tokens[:, t + 1] = perm[tokens[:, t]]
        yield tokens[:, :-1], tokens[:, 1:]


def lm_loss(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def train(name: str, steps: int = STEPS) -> tuple[list[float], torch.optim.Optimizer, torch.nn.Module]:
    model = tiny_model()
    opt = build_optimizer(dict(name=name, **CASES[name]), model)
    data = batches()
    losses = []
    for step in range(steps):
        factor = min(1.0, (step + 1) / 5)  # short warmup, as the trainer's schedule would
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * factor
        x, y = next(data)
        ctx = StepContext(model=model, micro_batches=[(x, y)], forward=model, step=step)

        def closure():
            opt.zero_grad()
            loss = lm_loss(model, x, y)
            loss.backward()
            return loss

        loss = closure()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if hasattr(opt, "before_step"):
            opt.before_step(ctx)
        opt.step(closure) if getattr(opt, "requires_closure", False) else opt.step()
        if hasattr(opt, "after_step"):
            opt.after_step(ctx)
        losses.append(loss.item())
    return losses, opt, model


def test_every_issue6_name_is_registered_and_covered():
    assert ISSUE_6_NAMES <= set(OPTIMIZERS)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_falls(name):
    losses, opt, model = train(name)
    first, last = losses[0], sum(losses[-5:]) / 5
    assert abs(first - math.log(VOCAB)) < 0.5
    assert all(math.isfinite(v) for v in losses)
    assert last < 0.5 * first, (name, first, last)
    # evaluation weights (Schedule-Free swaps to x) give a finite, lower loss too
    if hasattr(opt, "eval"):
        opt.eval()
    with torch.no_grad():
        x, y = next(batches())
        assert lm_loss(model, x, y).item() < first
    if hasattr(opt, "train"):
        opt.train()
    assert state_bytes(opt) > 0
