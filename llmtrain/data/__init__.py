"""Data pipeline: tokenizer, pre-tokenized packed shards, and a resumable sharded loader.

The trainer needs only ``build_data`` (and ``check_vocab``); ``prepare`` is the cached
pre-tokenisation step, also run alone by ``llmtrain-data``.
"""

from llmtrain.data.bundle import DataBundle, build_data, check_vocab
from llmtrain.data.config import DataConfig
from llmtrain.data.prepare import prepare

__all__ = ["DataBundle", "DataConfig", "build_data", "check_vocab", "prepare"]
