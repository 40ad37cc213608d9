"""Local stand-ins for the named recipes' hub corpora and tokenizers: parquet folders with the real
datasets' column names, and small tokenizers of the same kind as GPT-2's, LLaMA-2's and Llama-3's,
saved as Hugging Face tokenizer folders. Nothing here touches the network."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = ("the model data learning training language science history water energy students school "
         "research people world system health young children teachers natural process study").split()

# The columns of each dataset's parquet files on the hub (their dataset cards' "Data Fields").
COLUMNS = {
    "fineweb_edu": ("text", "id", "dump", "url", "file_path", "language", "language_score", "token_count",
                    "score", "int_score"),
    "slimpajama": ("text", "meta"),
    "fineweb": ("text", "id", "dump", "url", "date", "file_path", "language", "language_score", "token_count"),
}


def documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "."
                     for _ in range(rng.randint(4, 12))]
        docs.append(" ".join(sentences))
    return docs


def parquet_corpus(folder: Path, kind: str, n_docs: int = 120, files: int = 2) -> Path:
    """``files`` parquet files of ``kind``'s columns, as the hub's parquet conversion lays them out."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    texts = documents(n_docs)
    per_file = -(-n_docs // files)
    for i in range(files):
        chunk = texts[i * per_file:(i + 1) * per_file]
        columns = {}
        for name in COLUMNS[kind]:
            if name == "text":
                columns[name] = chunk
            elif name == "meta":
                columns[name] = [{"redpajama_set_name": "RedPajamaCommonCrawl"} for _ in chunk]
            elif name in ("language_score", "score"):
                columns[name] = [0.9 for _ in chunk]
            elif name in ("token_count", "int_score"):
                columns[name] = [len(t.split()) for t in chunk]
            else:
                columns[name] = [f"{name}-{i}-{j}" for j in range(len(chunk))]
        pq.write_table(pa.table(columns), folder / f"train-{i:05d}-of-{files:05d}.parquet")
    return folder


def _save(tok, folder: Path, **special) -> Path:
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(str(folder))
    return folder


def gpt2_like_tokenizer(folder: Path, vocab_size: int = 400) -> Path:
    """Byte-level BPE with ``<|endoftext|>`` as its only special token, as GPT-2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(documents(200, seed=1), trainer)
    return _save(tok, folder, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def llama2_like_tokenizer(folder: Path, vocab_size: int = 400) -> Path:
    """SentencePiece-style BPE with byte fallback: ``<unk>``, ``<s>``, ``</s>`` first, '▁' for spaces."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + 256, special_tokens=["<unk>", "<s>", "</s>", *bytes_],
                                  show_progress=False)
    tok.train_from_iterator(documents(200, seed=2), trainer)
    return _save(tok, folder, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def llama3_like_tokenizer(folder: Path, vocab_size: int = 400) -> Path:
    """Byte-level BPE behind Llama-3's split pattern, its special tokens after the merges."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(documents(200, seed=3), trainer)
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    return _save(tok, folder, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
