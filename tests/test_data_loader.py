"""The packed loader: ranks partition the global order, resume is exact across world sizes."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from llmtrain.data import DataConfig, build_data
from llmtrain.data.loader import EpochOrder
from llmtrain.errors import ConfigError, DataError

SEQ = 16
MICRO = 2
GLOBAL = 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = "to be or not that is the question whether tis nobler in mind suffer slings arrows".split()
    for i in range(30):
        (root / f"d{i:02d}.txt").write_text(" ".join(rng.choice(words) for _ in range(rng.randint(30, 120))))
    for i in range(6):
        (root / f"small{i}.jsonl").write_text(f'{{"text": "{" ".join(rng.choice(words) for _ in range(40))}"}}\n')
    return root


def cfg(corpus: Path, **kw) -> DataConfig:
    base = dict(name="loader", sources=[str(corpus / "*.txt")], vocab_size=280,
                cache_dir=str(corpus / "cache"), num_proc=1, progress=False)
    base.update(kw)
    return DataConfig(**base)


def bundle(corpus, rank=0, world=1, micro=MICRO, global_=GLOBAL, seed=7, **kw):
    return build_data(cfg(corpus, **kw), seq_len=SEQ, seed=seed, rank=rank, world_size=world,
                      micro_batch_size=micro, global_batch_size=global_)


def run_steps(loader, steps: int) -> list[list[tuple[torch.Tensor, np.ndarray]]]:
    """Per optimizer step: this rank's micro-batches as (x, window ids)."""
    out = []
    for _ in range(steps):
        out.append([])
        for _ in range(loader.accum_steps):
            x, y = loader.next_batch()
            assert x.shape == y.shape == (loader.micro_batch_size, SEQ) and x.dtype == torch.long
            assert x[:, 1:].equal(y[:, :-1])
            out[-1].append((x, loader.last_window_ids.copy()))
    return out


def global_step_windows(loaders, steps: int) -> list[torch.Tensor]:
    """Each step's global batch, ranks concatenated in rank order."""
    per_rank = [run_steps(ld, steps) for ld in loaders]
    return [torch.cat([x for rank in per_rank for x, _ in rank[s]]) for s in range(steps)]


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_partition_an_epoch_like_one_rank(corpus, world):
    single = bundle(corpus).train
    n = single.windows_per_epoch
    steps = -(-n // GLOBAL)
    ref = run_steps(single, steps)
    ref_ids = np.concatenate([ids for step in ref for _, ids in step])
    ranks = [bundle(corpus, rank=r, world=world).train for r in range(world)]
    per_rank = [run_steps(ld, steps) for ld in ranks]
    for s in range(steps):
        got = torch.cat([x for r in range(world) for x, _ in per_rank[r][s]])
        assert got.equal(torch.cat([x for x, _ in ref[s]]))
    # Stream position of every window taken: step*G + rank*(G/W) + micro*M + k.
    ids, positions = [], []
    for r in range(world):
        for s, step in enumerate(per_rank[r]):
            for j, (_, w) in enumerate(step):
                first = s * GLOBAL + r * (GLOBAL // world) + j * MICRO
                ids.append(w)
                positions.append(np.arange(first, first + MICRO))
    ids, positions = np.concatenate(ids), np.concatenate(positions)
    epoch0 = ids[positions < n]
    assert len(epoch0) == n and np.array_equal(np.sort(epoch0), np.arange(n))  # every window once
    assert np.array_equal(np.sort(ref_ids[:n]), np.arange(n))


def test_next_epoch_is_a_new_permutation(corpus):
    loader = bundle(corpus, micro=1, global_=1).train
    n = loader.windows_per_epoch
    ids = np.concatenate([w for step in run_steps(loader, 2 * n) for _, w in step])
    assert np.array_equal(np.sort(ids[n:]), np.arange(n)) and not np.array_equal(ids[:n], ids[n:])
    assert loader.state_dict()["epoch"] == 2


@pytest.mark.parametrize(("before", "after"), [(1, 1), (2, 1), (1, 2), (4, 2)])
def test_resume_continues_exactly_across_world_sizes(corpus, before, after):
    reference = global_step_windows([bundle(corpus).train], 9)
    first = [bundle(corpus, rank=r, world=before).train for r in range(before)]
    assert [torch.equal(a, b) for a, b in zip(global_step_windows(first, 5), reference[:5])] == [True] * 5
    states = [ld.state_dict() for ld in first]
    assert all(s == states[0] | {"world_size": before} for s in states)
    assert all(type(v) is int for v in states[0].values())
    resumed = [bundle(corpus, rank=r, world=after).train for r in range(after)]
    for ld in resumed:
        ld.load_state_dict(states[0])
    got = global_step_windows(resumed, 4)
    assert all(torch.equal(a, b) for a, b in zip(got, reference[5:]))


def test_resume_with_a_different_global_batch_continues_at_the_next_window(corpus):
    loader = bundle(corpus, micro=1, global_=1).train
    ids = np.concatenate([w for step in run_steps(loader, 24) for _, w in step])
    first = bundle(corpus).train  # global 8
    run_steps(first, 1)
    second = bundle(corpus, micro=2, global_=4).train
    second.load_state_dict(first.state_dict())
    got = np.concatenate([w for step in run_steps(second, 4) for _, w in step])
    assert np.array_equal(got, ids[8:24])


def test_prefetch_threads_give_the_same_batches_and_state(corpus):
    sync = bundle(corpus).train
    threaded = bundle(corpus, num_workers=2).train
    a, b = run_steps(sync, 3), run_steps(threaded, 3)
    for sa, sb in zip(a, b):
        for (xa, _), (xb, _) in zip(sa, sb):
            assert xa.equal(xb)
    assert sync.state_dict() == threaded.state_dict()
    state = sync.state_dict()
    more = run_steps(sync, 2)
    threaded.load_state_dict(state)  # restarts the prefetchers from the restored position
    again = run_steps(threaded, 2)
    assert all(xa.equal(xb) for sa, sb in zip(more, again) for (xa, _), (xb, _) in zip(sa, sb))
    threaded.close()


def test_mid_step_state_refuses_a_different_world_size(corpus):
    loader = bundle(corpus).train
    loader.next_batch()  # 1 of 4 micro-batches of the step
    state = loader.state_dict()
    assert state["micro"] == 1
    same = bundle(corpus).train
    same.load_state_dict(state)
    loader_x, _ = loader.next_batch()
    same_x, _ = same.next_batch()
    assert loader_x.equal(same_x)
    with pytest.raises(DataError, match="middle of an optimizer step"):
        bundle(corpus, rank=0, world=2).train.load_state_dict(state)


def test_state_from_other_data_or_seed_is_refused(corpus):
    state = bundle(corpus).train.state_dict()
    with pytest.raises(ConfigError, match=r"^train\.seed"):
        bundle(corpus, seed=8).train.load_state_dict(state)
    with pytest.raises(DataError, match="windows per epoch"):
        bundle(corpus, vocab_size=300).train.load_state_dict(state)


def test_seed_changes_the_order(corpus):
    a = run_steps(bundle(corpus, seed=1).train, 1)
    b = run_steps(bundle(corpus, seed=2).train, 1)
    assert not a[0][0][0].equal(b[0][0][0])


def test_val_batches_are_fixed_and_disjoint_across_ranks(corpus):
    b0 = bundle(corpus, rank=0, world=2)
    b1 = bundle(corpus, rank=1, world=2)
    first, second = b0.val_batches(3), b0.val_batches(3)
    assert len(first) == 3 and all(x1.equal(x2) and y1.equal(y2) for (x1, y1), (x2, y2) in zip(first, second))
    rows0 = {tuple(r) for x, _ in first for r in x.tolist()}
    rows1 = {tuple(r) for x, _ in b1.val_batches(3) for r in x.tolist()}
    assert rows0.isdisjoint(rows1)
    train_rows = {tuple(r) for step in run_steps(bundle(corpus, micro=8).train, 3) for x, _ in step for r in x.tolist()}
    assert rows0.isdisjoint(train_rows)


def test_no_val_split_is_a_clear_error(corpus):
    b = bundle(corpus, val_fraction=0.0)
    with pytest.raises(DataError, match=r"^data\.val_fraction: the validation split has no window"):
        b.val_batches(1)


def test_indivisible_batch_is_a_config_error(corpus):
    with pytest.raises(ConfigError, match=r"^train\.global_batch_size: 8 is not divisible"):
        bundle(corpus, micro=3)


def test_weighted_mixture_follows_the_weights(corpus):
    sources = [{"path": str(corpus / "*.txt"), "weight": 1.0}, {"path": str(corpus / "*.jsonl"), "weight": 3.0}]
    b = bundle(corpus, sources=sources, micro=1, global_=1)
    counts = b.train.index.counts
    n = int(counts.sum())
    ids = np.concatenate([w for step in run_steps(b.train, n) for _, w in step])
    from_small = int((ids >= counts[0]).sum())
    assert from_small == round(n * 3 / 4)  # the small source repeats to fill its share
    assert len(np.unique(ids[ids >= counts[0]])) == counts[1]  # ... and every one of its windows is used
    natural = bundle(corpus, sources=[s["path"] for s in sources], micro=1, global_=1)
    assert natural.train.order.quota is None and natural.train.windows_per_epoch == n


def test_epoch_order_quota_sums_to_epoch_size():
    order = EpochOrder(np.array([5, 7, 100]), [1.0, 1.0, 1.0], seed=3)
    assert order.quota.tolist() == [38, 37, 37] and order.quota.sum() == 112
    ids = order.epoch(0)
    assert len(ids) == 112 and ids.min() >= 0 and ids.max() < 112


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 1000, 4097])
def test_feistel_permutation_is_a_bijection(n):
    from llmtrain.data.permutation import permute

    out = permute(np.arange(n), n, (1, 2))
    assert np.array_equal(np.sort(out), np.arange(n))
    assert np.array_equal(out, permute(np.arange(n), n, (1, 2)))
    if n >= 17:
        assert not np.array_equal(out, permute(np.arange(n), n, (1, 3)))
        assert not np.array_equal(out, np.arange(n))
    # Pointwise evaluation agrees with the whole permutation.
    picks = np.array([0, n - 1, n // 2])
    assert np.array_equal(permute(picks, n, (1, 2)), out[picks])
