"""SOAP and GaLore against pytorch-optimizer; Shampoo and Adam-mini against the papers' equations."""

from __future__ import annotations


import pytest
import pytorch_optimizer as po
import torch
from torch import nn

from llmtrain.cpu_matmul import onednn_available, set_cpu_matmul
from llmtrain.models import build_model
from llmtrain.optim import build_optimizer
from llmtrain.optim.adam_mini import AdamMini
from llmtrain.optim.galore import GaLoreAdamW, galore_basis
from llmtrain.optim.protocol import state_bytes
from llmtrain.optim.shampoo import Shampoo, inverse_root
from llmtrain.optim.soap import SOAP
from optim_parity import assert_state_dict_round_trip, loss_fn, make_params, max_trajectory_diff, moved

# ------------------------------------------------------------------ SOAP


@pytest.fixture
def aten_matmul():
    """The reference's own products (``train.cpu_matmul=aten``): these tiny problems have rank-deficient
    statistics, whose null-space eigenvectors are arbitrary, so SOAP's basis there (and with it the
    trajectory) follows the last bit of the products; oneDNN's summation order gives other bits."""
    set_cpu_matmul("aten")  # conftest puts the default back after the test


@pytest.mark.skipif(not onednn_available(), reason="torch without oneDNN")
@pytest.mark.parametrize("name", ["soap", "shampoo"])
def test_matrix_optimizer_products_through_onednn(name, monkeypatch):
    """With cpu_matmul=onednn the preconditioner products go through oneDNN and, on full-rank
    statistics (square matrices, distinct eigenvalues), track the BLAS products' trajectory."""
    from llmtrain import cpu_matmul as module

    calls = []
    real = module.onednn_mm_t
    monkeypatch.setattr(module, "onednn_mm_t", lambda a, b: calls.append(a.shape) or real(a, b))
    make = {"soap": lambda p: SOAP(p, lr=1e-2, precondition_frequency=2),
            "shampoo": lambda p: Shampoo(p, lr=1e-2, precondition_frequency=2, start_preconditioning_step=2)}[name]
    finals = {}
    for backend in ("aten", "onednn"):
        set_cpu_matmul(backend)
        calls.clear()
        gen = torch.Generator().manual_seed(0)
        params = [nn.Parameter(torch.randn(8, 8, generator=gen)) for _ in range(2)]
        opt = make(params)
        for _ in range(8):
            for p in params:
                p.grad = torch.randn(8, 8, generator=gen)
            opt.step()
        finals[backend] = torch.stack([p.detach() for p in params])
        assert bool(calls) == (backend == "onednn")
    torch.testing.assert_close(finals["onednn"], finals["aten"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kw", [
    dict(lr=3e-3, betas=(0.95, 0.95), weight_decay=0.01, precondition_frequency=3),
    dict(lr=1e-2, betas=(0.9, 0.99), shampoo_beta=0.9, weight_decay=0.0, precondition_frequency=1, normalize_grads=True),
    dict(lr=1e-2, precondition_frequency=2, max_precond_dim=5, correct_bias=False),
])
def test_soap_matches_pytorch_optimizer(kw, aten_matmul):
    ref_kw = dict(kw)
    ref_kw["max_precondition_dim"] = ref_kw.pop("max_precond_dim", 10000)
    ref_kw["normalize_gradient"] = ref_kw.pop("normalize_grads", False)
    assert max_trajectory_diff(lambda p: SOAP(p, **kw), lambda p: po.SOAP(p, **ref_kw), steps=25) < 1e-6
    assert moved(lambda p: SOAP(p, **kw)) > 0.02


def test_soap_first_step_only_initialises():
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = SOAP(params, lr=0.1)
    loss_fn(params, 0).backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert all(len(opt.state[p]["Q"]) >= 1 for p in params)


# ------------------------------------------------------------------ GaLore


@pytest.mark.parametrize("gap", [1, 1000])
def test_galore_matches_pytorch_optimizer(gap):
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-10, weight_decay=0.01)

    def ours(p):  # matrices projected, the bias in a hybrid AdamW group without decay
        return GaLoreAdamW([dict(params=[p[0], p[2]], use_galore=True),
                            dict(params=[p[1]], use_galore=False, weight_decay=0.0, adamw_betas=(0.9, 0.99), adamw_eps=1e-10)],
                           rank=2, update_proj_gap=gap, scale=0.25, **kw)

    def ref(p):
        return po.GaLore([dict(params=[p[0], p[2]], rank=2, update_proj_gap=gap, scale=0.25, projection_type="std"),
                          dict(params=[p[1]], weight_decay=0.0)], foreach=False, **kw)

    assert max_trajectory_diff(ours, ref, steps=25) < 1e-6
    assert moved(ours) > 0.01


def test_galore_refreshes_projection_at_multiples_of_gap_and_keeps_low_rank_state():
    params = make_params()
    opt = GaLoreAdamW(params, lr=1e-2, rank=2, update_proj_gap=3)
    w1 = params[0]
    for step in range(7):
        opt.zero_grad()
        loss_fn(params, step).backward()
        if step % 3 == 0:
            expected = galore_basis(w1.grad, 2)
        opt.step()
        assert torch.equal(opt.state[w1]["basis"], expected), step
    assert opt.state[w1]["exp_avg"].shape == (6, 2)  # 6x5 weight, rank 2 on the 5-wide side


# ------------------------------------------------------------------ Shampoo


def test_inverse_root_is_an_inverse_fourth_root():
    a = torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = a @ a.T
    x = inverse_root(a, 4, 1e-12)
    assert torch.allclose(torch.linalg.matrix_power(x, 4) @ a, torch.eye(5, dtype=torch.float64), atol=1e-8)


def test_shampoo_diagonal_2x2_by_hand():
    """G = diag(a, b): L̂ = R̂ = diag(a², b²), S = L^-¼ G R^-¼ = diag(sign a, sign b) = Adam's step."""
    p = nn.Parameter(torch.zeros(2, 2))
    opt = Shampoo([p], lr=0.1, start_preconditioning_step=1, precondition_frequency=1, epsilon=1e-20, grafting_epsilon=1e-30)
    p.grad = torch.tensor([[4.0, 0.0], [0.0, -0.25]])
    opt.step()
    assert torch.allclose(p.detach(), torch.tensor([[-0.1, 0.0], [0.0, 0.1]]), atol=1e-6)


def _paper_shampoo(params, lr, betas, eps, graft_eps, wd, freq, start):
    """Shampoo + Adam grafting written from the equations, in float64, for the 2-D parameters."""
    b1, b2 = betas
    st = {}

    class Ref:
        @staticmethod
        def step():
            for p in params:
                g = p.grad.double()
                s = st.setdefault(id(p), dict(t=0, m=torch.zeros_like(g), v=torch.zeros_like(g),
                                               L=torch.zeros(g.shape[0], g.shape[0], dtype=torch.float64),
                                               R=torch.zeros(g.shape[1], g.shape[1], dtype=torch.float64)))
                s["t"] += 1
                t = s["t"]
                s["m"] = b1 * s["m"] + (1 - b1) * g
                s["v"] = b2 * s["v"] + (1 - b2) * g * g
                s["L"] = b2 * s["L"] + (1 - b2) * g @ g.T
                s["R"] = b2 * s["R"] + (1 - b2) * g.T @ g

                def root(a):
                    w, q = torch.linalg.eigh(a + eps * torch.eye(a.shape[0], dtype=torch.float64))
                    return q @ torch.diag(w.clamp(min=eps) ** -0.25) @ q.T

                if (t - 1) % freq == 0 or t == start:
                    s["Lr"], s["Rr"] = root(s["L"] / (1 - b2**t)), root(s["R"] / (1 - b2**t))
                mhat = s["m"] / (1 - b1**t)
                adam = mhat / ((s["v"] / (1 - b2**t)).sqrt() + graft_eps)
                if t >= start:
                    shampoo = s["Lr"] @ mhat @ s["Rr"]
                    d = shampoo * adam.norm() / shampoo.norm()
                else:
                    d = adam
                with torch.no_grad():
                    p.copy_((p.double() * (1 - lr * wd) - lr * d).float())

        @staticmethod
        def zero_grad():
            for p in params:
                p.grad = None
    return Ref()


def test_shampoo_matches_the_equations():
    kw = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01, precondition_frequency=4, start_preconditioning_step=3)
    shapes = ((6, 5), (3, 6))
    ours = lambda p: Shampoo(p, epsilon=1e-10, grafting_epsilon=1e-8, **kw)  # noqa: E731
    ref = lambda p: _paper_shampoo(p, 1e-2, (0.9, 0.99), 1e-10, 1e-8, 0.01, 4, 3)  # noqa: E731

    import optim_parity

    orig = optim_parity.loss_fn
    optim_parity.loss_fn = lambda params, step: orig([params[0], torch.zeros(6), params[1]], step)
    try:
        diff = max_trajectory_diff(ours, ref, steps=25, shapes=shapes)
        assert diff < 1e-5, diff
        assert moved(ours, shapes=shapes) > 0.05
    finally:
        optim_parity.loss_fn = orig


# ------------------------------------------------------------------ Adam-mini


class _EmbedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.lm_head = nn.Linear(4, 7, bias=False)

    def forward(self, idx):
        return self.lm_head(torch.tanh(self.embed(idx)))


def test_adam_mini_with_per_coordinate_blocks_is_adamw():
    """Embeddings and the head keep Adam's per-coordinate v, so on them Adam-mini is AdamW."""
    torch.manual_seed(0)
    results = []
    for make in (lambda m: AdamMini(m.parameters(), lr=1e-2, weight_decay=0.1, model=m),
                 lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)):
        model = _EmbedHead()
        model.load_state_dict(_EmbedHead_init())
        opt = make(model)
        for step in range(20):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randint(0, 7, (8,), generator=g), torch.randint(0, 7, (8,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    assert max((a - b).abs().max().item() for a, b in zip(*results)) < 1e-6


def _EmbedHead_init():
    torch.manual_seed(123)
    return _EmbedHead().state_dict()


def test_adam_mini_row_blocks_by_hand():
    """2×2 weight, one v per row: v_r = (1-β2)·mean(g_r²) after step 1, θ -= lr·m̂/(√v̂ + ε)."""
    p = nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    opt = AdamMini([p], lr=0.1, betas=(0.9, 0.999), eps=0.0, weight_decay=0.0)
    grads = [torch.tensor([[1.0, -3.0], [2.0, 0.0]]), torch.tensor([[0.5, 1.0], [-2.0, 2.0]])]
    b1, b2, lr = 0.9, 0.999, 0.1
    m = torch.zeros(2, 2, dtype=torch.float64)
    v = torch.zeros(2, 1, dtype=torch.float64)
    theta = p.detach().double().clone()
    for t, g in enumerate(grads, start=1):
        p.grad = g.clone()
        opt.step()
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * (g**2).mean(dim=1, keepdim=True)
        theta = theta - lr * (m / (1 - b1**t)) / (v / (1 - b2**t)).sqrt()
        assert torch.allclose(p.detach().double(), theta, atol=1e-6)
    # first step by hand: row 0 mean g² = 5 → step -0.1·[1, -3]/√5; row 1 mean g² = 2 → -0.1·[2, 0]/√2
    assert opt.state[p]["v"].shape == (2, 1)


def test_adam_mini_blocks_follow_the_model():
    model = build_model(dict(name="t", family="llama", n_layers=1, d_model=32, n_heads=4, n_kv_heads=2,
                             vocab_size=64, max_seq_len=16, tie_embeddings=False))
    opt = build_optimizer({"name": "adam_mini", "lr": 1e-3}, model)
    x = torch.randint(0, 64, (2, 8))
    nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    opt.step()
    attn = model.layers[0].attn if hasattr(model.layers[0], "attn") else model.layers[0].attention
    v = lambda prm: opt.state[prm]["v"].shape  # noqa: E731
    assert v(attn.q_proj.weight) == (4, 1)        # one per head
    assert v(attn.k_proj.weight) == (2, 1)        # one per kv head
    assert v(attn.v_proj.weight) == (16, 1)       # one per output neuron
    assert v(model.embed.weight) == model.embed.weight.shape
    assert v(model.lm_head.weight) == model.lm_head.weight.shape
    assert v(model.norm.weight) == (1,)


def test_adam_mini_state_is_about_4_bytes_per_param():
    p = nn.Parameter(torch.randn(512, 512))
    opt = AdamMini([p], lr=1e-3)
    p.grad = torch.randn_like(p)
    opt.step()
    assert 4.0 <= state_bytes(opt) / p.numel() < 4.01


@pytest.mark.parametrize("factory", [
    lambda p: SOAP(p, lr=1e-2, precondition_frequency=2),
    lambda p: GaLoreAdamW(p, lr=1e-2, rank=2, update_proj_gap=2),
    lambda p: Shampoo(p, lr=1e-2, precondition_frequency=2, start_preconditioning_step=2),
    lambda p: AdamMini(p, lr=1e-2),
])
def test_round_trip(factory):
    assert_state_dict_round_trip(factory, steps=4)
