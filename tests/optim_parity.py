"""A small random problem and a step-for-step comparison of two optimizers on it."""

from __future__ import annotations

from typing import Callable

import torch

OptFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def make_params(seed: int = 0, shapes=((6, 5), (6,), (3, 6))) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g, dtype=torch.float32)) for s in shapes]


def loss_fn(params: list[torch.Tensor], step: int) -> torch.Tensor:
    """A different mini-batch every step of a tiny 2-layer regression (non-quadratic, non-separable)."""
    g = torch.Generator().manual_seed(1000 + step)
    w1, b1, w2 = params
    x = torch.randn(8, w1.shape[1], generator=g)
    y = torch.randn(8, w2.shape[0], generator=g)
    h = torch.tanh(x @ w1.T + b1)
    return ((h @ w2.T - y) ** 2).mean() + 0.01 * (w1**2).sum()


def trajectory(
    factory: OptFactory, steps: int = 20, seed: int = 0, closure: bool = False, shapes=((6, 5), (6,), (3, 6))
) -> list[list[torch.Tensor]]:
    """Parameters after each of ``steps`` steps of ``factory(params)`` on the random problem."""
    params = make_params(seed, shapes)
    opt = factory(params)
    out = []
    for step in range(steps):
        def closure_fn(step=step):
            opt.zero_grad()
            loss = loss_fn(params, step)
            loss.backward()
            return loss

        closure_fn()  # the trainer's forward/backward, then step (with the closure if asked)
        opt.step(closure_fn) if closure else opt.step()
        out.append([p.detach().clone() for p in params])
    return out


def max_trajectory_diff(a: OptFactory, b: OptFactory, steps: int = 20, **kw) -> float:
    """Largest absolute parameter difference between two optimizers over the whole trajectory."""
    ta, tb = trajectory(a, steps, **kw), trajectory(b, steps, **kw)
    assert len(ta) == len(tb) == steps
    return max((x - y).abs().max().item() for pa, pb in zip(ta, tb) for x, y in zip(pa, pb))


def moved(factory: OptFactory, steps: int = 20, **kw) -> float:
    """How far the parameters moved (so a parity test cannot pass with an optimizer that does nothing)."""
    start = make_params(kw.get("seed", 0), kw.get("shapes", ((6, 5), (6,), (3, 6))))
    end = trajectory(factory, steps, **kw)[-1]
    return max((x - y).abs().max().item() for x, y in zip(start, end))


def assert_state_dict_round_trip(factory: OptFactory, steps: int = 3, closure: bool = False, **kw) -> None:
    """Save after ``steps`` steps, load into a fresh optimizer, and check the next step is identical."""
    import copy

    params = make_params(kw.get("seed", 0), kw.get("shapes", ((6, 5), (6,), (3, 6))))
    opt = factory(params)

    def step(opt, i):
        def closure_fn():
            opt.zero_grad()
            loss = loss_fn(params, i)
            loss.backward()
            return loss

        closure_fn()
        opt.step(closure_fn) if closure else opt.step()

    for i in range(steps):
        step(opt, i)
    saved_params = [p.detach().clone() for p in params]
    saved_state = copy.deepcopy(opt.state_dict())
    step(opt, steps)
    expected = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, s in zip(params, saved_params):
            p.copy_(s)
    fresh = factory(params)
    fresh.load_state_dict(saved_state)
    step(fresh, steps)
    for p, e in zip(params, expected):
        assert torch.allclose(p, e, atol=1e-7, rtol=0), (p - e).abs().max()
