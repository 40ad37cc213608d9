"""Token budget: how many passes over the training split a run's planned tokens make.

A recipe that trains 500k steps of 4M tokens on a 1M-token corpus is a demo, not a pretraining run,
and nothing fails to say so. ``epochs`` is planned training tokens (max_steps x global batch x
seq_len) over the training split's tokens: exact when the data is prepared (its meta.json), else
estimated from each source's ``tokens`` (the size its dataset card states) less the validation
share, else unknown. With source weights every source is repeated at its own rate; the largest
rate is what the warning looks at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from llmtrain.data.config import DataConfig
from llmtrain.errors import UserError

# Up to ~4 epochs, repeated tokens train almost as well as new ones; beyond, their value decays fast
# (Muennighoff et al. 2023, "Scaling Data-Constrained Language Models", section 5).
EPOCHS_WARNING = 4.0


@dataclass
class CorpusSize:
    """Training-split tokens per source, and whether they were counted (prepared) or estimated."""

    names: list[str]
    train_tokens: list[float]
    exact: bool


def prepared_size(meta: dict) -> CorpusSize:
    """The exact split sizes of a prepared folder's ``meta.json``."""
    return CorpusSize([s["path"] for s in meta["sources"]],
                      [float(s["splits"]["train"]["tokens"]) for s in meta["sources"]], exact=True)


def corpus_size(cfg: DataConfig) -> tuple[Optional[CorpusSize], Optional[str]]:
    """The training split's size without preparing anything, or None and the reason it is unknown.

    Never reads the corpus, never installs the default one and never touches the network: a dry
    run must plan offline.
    """
    from llmtrain.data.prepare import load_meta, prepared_folder
    from llmtrain.data.sources import resolve_sources

    try:
        if not cfg.sources:
            from llmtrain.data.shakespeare import shakespeare_files

            shakespeare_files(install=False)
        folder = prepared_folder(cfg)
        if folder is not None:
            return prepared_size(load_meta(folder)), None
        specs = resolve_sources(list(cfg.sources))
    except UserError as err:
        return None, f"the training split's size is unknown ({err})"
    if any(s.tokens is None for s in specs):
        return None, ("the training split's size is unknown until the data is prepared (llmtrain-data ...) or each "
                      "of data.sources states its size in tokens")
    keep = 1.0 - cfg.val_fraction
    return CorpusSize([s.path for s in specs], [s.tokens * keep for s in specs], exact=False), None


def planned_tokens(max_steps: int, global_batch_size: int, seq_len: int) -> int:
    return max_steps * global_batch_size * seq_len


def epochs(planned: float, size: CorpusSize, weights: Optional[list[float]]) -> dict[str, Any]:
    """Passes over the training split overall and per source (natural shares unless ``weights``)."""
    total = sum(size.train_tokens)
    shares = [t / total for t in size.train_tokens] if weights is None else [w / sum(weights) for w in weights]
    # a split without tokens cannot be passed over at all: None, not an infinity JSON cannot hold
    per_source = {name: (planned * share / tokens if tokens else None)
                  for name, share, tokens in zip(size.names, shares, size.train_tokens)}
    return {"epochs": planned / total if total else None, "epochs_per_source": per_source,
            "planned_tokens": planned, "train_split_tokens": total,
            "train_split_tokens_source": "prepared" if size.exact else "estimated from data.sources[].tokens"}


def source_weights(sources: list) -> Optional[list[float]]:
    """None (natural shares) unless some source of ``data.sources`` sets a weight; then unset ones count as 1."""
    raw = [src.get("weight") if isinstance(src, dict) else None for src in sources]
    if all(w is None for w in raw):
        return None
    return [1.0 if w is None else float(w) for w in raw]


def run_budget(max_steps: int, global_batch_size: int, seq_len: int, sources: list,
               size: CorpusSize) -> dict[str, Any]:
    """``epochs`` for a run of these train settings over ``data.sources`` of this size."""
    return epochs(planned_tokens(max_steps, global_batch_size, seq_len), size, source_weights(sources))


def epochs_warning(budget: dict[str, Any]) -> Optional[str]:
    """One line when some source would be seen more than EPOCHS_WARNING times."""
    known = {name: e for name, e in budget["epochs_per_source"].items() if e is not None}
    if not known:
        return None
    worst_name, worst = max(known.items(), key=lambda kv: kv[1])
    if worst <= EPOCHS_WARNING:
        return None
    how = "" if budget["train_split_tokens_source"] == "prepared" else " (estimated)"
    of = (f"the {budget['train_split_tokens']:,.0f}-token training split{how}" if len(budget["epochs_per_source"]) == 1
          else f"{worst_name}'s training split{how} at its share of the mixture")
    return (f"warning: train.max_steps x global batch x seq_len = {budget['planned_tokens']:,.0f} tokens is "
            f"{worst:,.1f} epochs of {of}; above {EPOCHS_WARNING:g} epochs repeated data stops helping: "
            f"use a larger corpus or fewer steps")
