"""Issue 11's extra references for the core registry's entries: the PyPI packages of the original
authors (sophia-opt for Sophia-G, galore-torch for GaLore), where the core tests compare with a
transcription or with the pytorch-optimizer port. Imports the core classes through the registry."""

from __future__ import annotations

import pytest
import torch

from llmtrain.optim import OPTIMIZERS

from optim_parity import loss_fn, make_params, max_trajectory_diff, moved  # noqa: E402


def test_sophia_matches_sophia_opt_with_periodic_hessian_refresh():
    sophia_opt = pytest.importorskip("sophia_opt")
    k, bs, steps = 3, 64, 25
    kw = dict(lr=1e-2, betas=(0.9, 0.95), rho=0.05, weight_decay=0.1)
    pa, pb = make_params(), make_params()
    ours, ref = OPTIMIZERS["sophia"](pa, bs=bs, hess_interval=k, **kw), sophia_opt.SophiaG(pb, **kw)
    worst = 0.0
    for step in range(steps):
        for opt, params in ((ours, pa), (ref, pb)):
            opt.zero_grad()
            loss_fn(params, step).backward()
            opt.step(bs=bs) if opt is ref else opt.step()
            if step % k == k - 1:  # the reference training loop's Hessian (GNB) refresh
                opt.zero_grad()
                (loss_fn(params, 500 + step) * 3.0).backward()
                opt.update_hessian()
        worst = max(worst, max((a - b).abs().max().item() for a, b in zip(pa, pb)))
    assert worst < 1e-6
    assert max((a - s).abs().max().item() for a, s in zip(pa, make_params())) > 0.05


@pytest.mark.parametrize("gap", [1, 3, 1000])
def test_galore_matches_galore_torch(gap):
    galore_torch = pytest.importorskip("galore_torch")
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-10, weight_decay=0.01)

    def ours(p):
        return OPTIMIZERS["galore_adamw"](
            [dict(params=[p[0], p[2]], use_galore=True),
             dict(params=[p[1]], use_galore=False, weight_decay=0.0, adamw_betas=(0.9, 0.99), adamw_eps=1e-10)],
            rank=2, update_proj_gap=gap, scale=0.25, **kw)

    def ref(p):
        return galore_torch.GaLoreAdamW(
            [dict(params=[p[0], p[2]], rank=2, update_proj_gap=gap, scale=0.25, proj_type="std"),
             dict(params=[p[1]], weight_decay=0.0)], no_deprecation_warning=True, **kw)

    assert max_trajectory_diff(ours, ref, steps=25) < 2e-6  # 1.4e-6 achieved
    assert moved(ours) > 0.01


def test_adam_mini_blocks_match_the_adam_mini_package_on_a_tiny_llama():
    """Same random gradients fed to both for 20 steps; every hidden block (q/k per head, v/o/MLP per
    row, norms per tensor) agrees. Embedding and head are left out on purpose: adam-mini 1.1.1 gives
    them one v per row, while ours keeps the paper's per-coordinate v for them."""
    adam_mini = pytest.importorskip("adam_mini")
    import copy

    from test_optim_extra_train import tiny_model

    ours_model = tiny_model()
    ref_model = copy.deepcopy(ours_model)
    from llmtrain.optim import build_optimizer

    ours = build_optimizer({"name": "adam_mini", "lr": 1e-2, "weight_decay": 0.1, "no_decay_embedding": False},
                           ours_model)
    # The package matches blocks by substrings of parameter names: "mlp" in "mlp_norm" would make a
    # norm an MLP block, so norms are renamed to names it reads as norms ("ln").
    renamed = [(n.replace("mlp_norm", "ffn_ln").replace("attn_norm", "att_ln").replace("norm.", "ln."), p)
               for n, p in ref_model.named_parameters()]
    ref = adam_mini.Adam_mini(renamed, lr=1e-2, weight_decay=0.1, dim=32, n_heads=4, n_kv_heads=2, verbose=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        for p, q in zip(ours_model.parameters(), ref_model.parameters()):
            grad = torch.randn(p.shape, generator=g)
            p.grad, q.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
    start = dict(tiny_model().named_parameters())  # tiny_model reseeds, so this is the initial state
    compared = 0
    for (name, a), (_, b) in zip(ours_model.named_parameters(), ref_model.named_parameters()):
        if name.startswith(("embed", "lm_head", "output")):
            continue
        assert (a - start[name]).abs().max() > 1e-2, name
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
        compared += 1
    assert compared == 19
