"""Muon against the published update (KellerJordan/Muon, reproduced below) and its hybrid groups."""

from __future__ import annotations

import pytest
import torch

from llmtrain.models import build_model
from llmtrain.optim import build_optimizer
from llmtrain.optim.muon import Muon, zeropower_via_newtonschulz5
from optim_parity import assert_state_dict_round_trip, max_trajectory_diff, moved
from reference_muon import RefMuonWithAuxAdam, ref_zeropower_via_newtonschulz5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """bf16 matmuls on tiny matrices: one thread avoids oversubscription on shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)




def _ref(params):
    w1, b1, w2 = params
    return RefMuonWithAuxAdam([
        dict(params=[w1, w2], use_muon=True, lr=0.02, momentum=0.95, weight_decay=0.01),
        dict(params=[b1], use_muon=False, lr=3e-3, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.01),
    ])


def _ours(params):
    w1, b1, w2 = params
    return Muon([
        dict(params=[w1, w2], use_muon=True),
        dict(params=[b1], use_muon=False, lr=3e-3),
    ], lr=0.02, momentum=0.95, weight_decay=0.01, adamw_betas=(0.9, 0.95), adamw_eps=1e-10)


def test_matches_published_update():
    assert max_trajectory_diff(_ours, _ref, steps=25) < 1e-6
    assert moved(_ours) > 0.1


def test_plain_parameter_list_sends_vectors_to_adamw():
    flat = lambda p: Muon(p, lr=0.02, weight_decay=0.01, adamw_betas=(0.9, 0.95), adamw_eps=1e-10)  # noqa: E731

    def ref(params):
        w1, b1, w2 = params
        return RefMuonWithAuxAdam([
            dict(params=[w1, w2], use_muon=True, lr=0.02, momentum=0.95, weight_decay=0.01),
            dict(params=[b1], use_muon=False, lr=0.02, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.01),
        ])

    assert max_trajectory_diff(flat, ref, steps=20) < 1e-6


def test_newton_schulz_orthogonalises():
    g = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(zeropower_via_newtonschulz5(g).float())
    assert s.min() > 0.6 and s.max() < 1.25, s
    assert torch.equal(zeropower_via_newtonschulz5(g), ref_zeropower_via_newtonschulz5(g, 5))


def test_round_trip():
    assert_state_dict_round_trip(_ours)


def test_build_optimizer_hybrid_groups():
    model = build_model(dict(name="t", family="llama", n_layers=1, d_model=32, n_heads=4, vocab_size=64, max_seq_len=16,
                             tie_embeddings=False))
    opt = build_optimizer({"name": "muon", "lr": 0.02, "adamw_lr": 1e-3, "adamw_betas": [0.9, 0.95]}, model)
    muon_ids = {id(p) for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    assert id(model.embed.weight) not in muon_ids and id(model.lm_head.weight) not in muon_ids
    attn_mlp = [p for n, p in model.layers.named_parameters() if p.ndim == 2]
    assert attn_mlp and all(id(p) in muon_ids for p in attn_mlp)
    assert all(g["lr"] == (0.02 if g["use_muon"] else 1e-3) for g in opt.param_groups)
    x = torch.randint(0, 64, (2, 8))
    torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    opt.step()
