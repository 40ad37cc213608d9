"""Data pipeline: tokenizer, pre-tokenized packed shards, and a resumable sharded loader.

The trainer needs only ``build_data`` (and ``check_vocab``); ``llmtrain.data.prepare.prepare`` is
the cached pre-tokenisation step, also run alone by ``llmtrain-data``. The heavy names are loaded
on first use so that importing the config schema (``llmtrain.data.config``) stays cheap and
``python -m llmtrain.data.prepare`` does not import its own module twice.
"""

from llmtrain.data.config import DataConfig

__all__ = ["DataBundle", "DataConfig", "build_data", "check_vocab"]


def __getattr__(name: str):
    if name in ("DataBundle", "build_data", "check_vocab"):
        from llmtrain.data import bundle

        return getattr(bundle, name)
    raise AttributeError(f"module 'llmtrain.data' has no attribute {name!r}")
