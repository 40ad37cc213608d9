"""Sophia-G against the published SophiaG update and training-loop Hessian refresh (Liuhong99/Sophia)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmtrain.optim.protocol import StepContext
from llmtrain.optim.sophia import SophiaG
from optim_parity import assert_state_dict_round_trip, loss_fn, make_params


# ---- reference: Liuhong99/Sophia sophia.py (SophiaG.update_hessian and the single-tensor step) ----
class RefSophiaG(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-4, betas=(0.965, 0.99), rho=0.04, weight_decay=1e-1):
        super().__init__(params, dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay))

    @torch.no_grad()
    def update_hessian(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.zeros((1,), dtype=torch.float)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["hessian"] = torch.zeros_like(p)
                state["hessian"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)

    @torch.no_grad()
    def step(self, bs=5120):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.zeros((1,), dtype=torch.float)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["hessian"] = torch.zeros_like(p)
                exp_avg, hess = state["exp_avg"], state["hessian"]
                state["step"] += 1
                p.mul_(1 - group["lr"] * group["weight_decay"])
                exp_avg.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                ratio = (exp_avg.abs() / (group["rho"] * bs * hess + 1e-15)).clamp(None, 1)
                p.addcmul_(exp_avg.sign(), ratio, value=-group["lr"])
# ---- end of reference ----


def _hessian_loss(params, step):
    """Stands in for the sampled-label loss of the reference loop: a different fixed function."""
    return loss_fn(params, 500 + step) * 3.0


def test_matches_reference_with_periodic_hessian_updates():
    k, bs, steps = 3, 64, 25
    kw = dict(lr=1e-2, betas=(0.9, 0.95), rho=0.05, weight_decay=0.1)
    pa, pb = make_params(), make_params()
    ours, ref = SophiaG(pa, bs=bs, hess_interval=k, **kw), RefSophiaG(pb, **kw)
    for step in range(steps):
        for opt, params in ((ours, pa), (ref, pb)):
            opt.zero_grad()
            loss_fn(params, step).backward()
            opt.step(bs=bs) if opt is ref else opt.step()
            if step % k == k - 1:  # the reference loop's hessian refresh
                opt.zero_grad()
                _hessian_loss(params, step).backward()
                opt.update_hessian()
        for a, b in zip(pa, pb):
            assert torch.allclose(a, b, atol=1e-6, rtol=0), step
    assert max((a - s).abs().max() for a, s in zip(pa, make_params())) > 0.05
    assert all(ours.state[p]["hessian"].abs().sum() > 0 for p in pa)


class _TinyLM(torch.nn.Module):
    def __init__(self, vocab=11, dim=8):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.lm_head = torch.nn.Linear(dim, vocab)

    def forward(self, idx):
        return self.lm_head(torch.tanh(self.embed(idx)))


def test_after_step_refreshes_every_k_steps_with_sampled_labels_and_clears_grads():
    torch.manual_seed(0)
    model = _TinyLM()
    opt = SophiaG(model.parameters(), lr=1e-3, hess_interval=2)
    batches = [(torch.randint(0, 11, (2, 5)), torch.randint(0, 11, (2, 5))) for _ in range(2)]
    ctx = lambda step: StepContext(model=model, micro_batches=batches, forward=model, step=step)  # noqa: E731
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    opt.after_step(ctx(0))  # step 0: no refresh (first refresh after step k-1 = 1)
    assert all(opt.state[p]["hessian"].abs().sum() == 0 for p in model.parameters())
    opt.after_step(ctx(1))
    assert all(p.grad is None for p in model.parameters())
    assert all(opt.state[p]["hessian"].abs().sum() > 0 for p in model.parameters())
    assert opt.param_groups[0]["bs"] == 2 * 2 * 5  # tokens per step measured from the micro-batches
    # the estimate is the squared gradient of the loss on labels sampled from the model (GNB)
    expected = None
    torch.manual_seed(1)
    opt2 = SophiaG(model.parameters(), lr=1e-3, hess_interval=1, betas=(0.9, 0.0))
    state = torch.random.get_rng_state()
    opt2.after_step(ctx(0))
    torch.random.set_rng_state(state)
    model.zero_grad()
    for x, _ in batches:
        logits = model(x).reshape(-1, 11).float()
        y = torch.multinomial(F.softmax(logits, -1), 1).squeeze(-1)
        (F.cross_entropy(logits, y) / 2).backward()
    expected = model.lm_head.weight.grad ** 2
    assert torch.allclose(opt2.state[model.lm_head.weight]["hessian"], expected)


def test_round_trip():
    assert_state_dict_round_trip(lambda p: SophiaG(p, lr=1e-2, bs=16))
