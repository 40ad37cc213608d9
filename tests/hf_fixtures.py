"""Hugging Face stand-ins for tests that must not touch the network: small saved models, a folder laid
out as huggingface_hub's cache, and fakes of its download functions that copy from a local folder."""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path
from typing import Optional

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=500000.0,
                tie_word_embeddings=False, initializer_range=0.2)
    return LlamaConfig(**{**base, **kw})


def gpt2_config(**kw):
    from transformers import GPT2Config

    base = dict(vocab_size=101, n_embd=48, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.1,
                layer_norm_epsilon=1e-5, initializer_range=0.2)
    return GPT2Config(**{**base, **kw})


def save_config(folder: Path, config) -> Path:
    """A folder holding only config.json (no weights)."""
    config.save_pretrained(folder)
    return folder


def save_model(folder: Path, config, seed: int = 0, safetensors: bool = True) -> Path:
    """A random HF model of ``config`` saved with its weights."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if safetensors:
        model.save_pretrained(folder)
    else:  # the older pickled layout (transformers 5 writes safetensors only)
        config.save_pretrained(folder)
        torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "pytorch_model.bin")
    return folder


def word_tokenizer(corpus: Path, out: Path) -> Path:
    """A word-level tokenizer.json over the corpus's words with an end-of-text token, in ``out``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted(set(corpus.read_text().lower().replace(".", " ").split()))
    vocab = {w: i for i, w in enumerate(["<unk>", "<|endoftext|>", ".", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return out


def tokenizer_size(folder: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()


def hub_cache(root: Path, repo_id: str, source: Path) -> Path:
    """Lay ``root`` out as huggingface_hub's cache holding ``source``'s files as ``repo_id`` at one commit."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(source, snapshot, dirs_exist_ok=True)
    return root


class FakeHub:
    """``hf_hub_download`` / ``snapshot_download`` serving ``repos`` (repo id -> local folder) into ``out``,
    recording each call; an unknown id raises the hub's RepositoryNotFoundError."""

    def __init__(self, out: Path, repos: dict[str, Path]):
        self.out, self.repos, self.calls = out, repos, []

    def _repo(self, repo_id: str) -> Path:
        if repo_id not in self.repos:
            raise not_found(repo_id)
        return self.repos[repo_id]

    def hf_hub_download(self, repo_id: str, filename: str, *, local_files_only: bool = False, **_) -> str:
        self.calls.append(("file", repo_id, filename, local_files_only))
        if local_files_only:
            from huggingface_hub.errors import LocalEntryNotFoundError

            raise LocalEntryNotFoundError("not in the cache")
        src = self._repo(repo_id) / filename
        dest = self.out / repo_id / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        return str(dest)

    def snapshot_download(self, repo_id: str, *, allow_patterns: Optional[list[str]] = None,
                          local_files_only: bool = False, **_) -> str:
        self.calls.append(("snapshot", repo_id, tuple(allow_patterns or ()), local_files_only))
        if local_files_only:
            from huggingface_hub.errors import LocalEntryNotFoundError

            raise LocalEntryNotFoundError("not in the cache")
        src = self._repo(repo_id)
        dest = self.out / repo_id
        for f in src.rglob("*"):
            rel = f.relative_to(src).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns or ["*"]):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dest / rel)
        dest.mkdir(parents=True, exist_ok=True)
        return str(dest)

    def install(self, monkeypatch) -> FakeHub:
        import huggingface_hub

        import llmtrain.data.hub

        monkeypatch.setattr(huggingface_hub, "hf_hub_download", self.hf_hub_download)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", self.snapshot_download)
        monkeypatch.setattr(llmtrain.data.hub, "hub_reachable", lambda: True)
        return self


def not_found(repo_id: str):
    """The error huggingface_hub raises for a repository the hub does not have (404)."""
    import httpx
    from huggingface_hub.errors import RepositoryNotFoundError

    url = f"https://huggingface.co/api/models/{repo_id}"
    response = httpx.Response(404, request=httpx.Request("GET", url))
    return RepositoryNotFoundError(f"404 Client Error. Repository Not Found for url: {url}.", response=response)
