"""Nothing in a checkpoint can run code: a payload (a pickle whose ``__reduce__`` is ``os.system``)
planted in each file of each layout is refused with a one-line CheckpointError by ``restore``,
``load_model_state`` (export and ``model.init_from`` of a checkpoint go through it) and
``llmtrain-export``, and the payload never runs. Hugging Face folders for ``model.init_from`` too."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from llmtrain import checkpoint
from llmtrain.errors import CheckpointError
from llmtrain.export import load_init_weights, main, to_hf
from llmtrain.models import build_model
from llmtrain.optim import build_optimizer

from conftest import REPO, torchrun_env

# The model tests/dist_worker.py trains, so its sharded checkpoint restores into this one.
MODEL = dict(family="llama", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=32,
             ffn_hidden=128)
OPTIM = {"name": "adamw", "lr": 3e-3}
KINDS = ("pickle", "torch", "nested")  # a bare pickle, a torch.save'd payload, a payload inside real content
SINGLE_FILES = ("model.pt", "optim.pt", "trainer.pt")
SHARDED_FILES = ("dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "optim_meta.pt", "trainer.pt")
MODEL_FILES = {"model.pt", "dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp"}  # what export reads


class Payload:
    """Unpickling this runs ``touch sentinel``."""

    def __init__(self, sentinel: Path):
        self.command = f"touch '{sentinel}'"

    def __reduce__(self):
        return os.system, (self.command,)


def torch_saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def write_run_config(run: Path) -> None:
    OmegaConf.save({"model": MODEL}, run / "config.yaml")


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> Path:
    """A one-process run: model.pt, optim.pt, trainer.pt after one AdamW step."""
    run = tmp_path_factory.mktemp("single")
    torch.manual_seed(0)
    model = build_model(MODEL)
    optimizer = build_optimizer(OPTIM, model)
    x = torch.randint(0, 128, (2, 17))
    F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    optimizer.step()
    checkpoint.save_checkpoint(run, 1, model.state_dict(), optimizer.state_dict(), {"step": 1})
    write_run_config(run)
    return run


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> Path:
    """A real 2-rank FSDP run (torchrun, gloo): dcp/.metadata, a .distcp per rank, optim_meta.pt, trainer.pt."""
    run = tmp_path_factory.mktemp("sharded")
    spec = {"strategy": "fsdp", "optim": OPTIM["name"], "lr": OPTIM["lr"], "steps": 1, "save_at": 1,
            "run_dir": str(run), "out": str(run / "worker.json")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "tests" / "dist_worker.py"), json.dumps(spec)]
    proc = subprocess.run(cmd, cwd=run, env=torchrun_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    write_run_config(run)
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_run(run: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of ``run`` and its (only) checkpoint."""
    dest = tmp_path / "run"
    shutil.copytree(run, dest)
    return dest, checkpoint.latest_checkpoint(dest)


def rewrite_shard(dcp_dir: Path, name: str, record: bytes, as_bytes: bool) -> None:
    """Replace every record of the shard file ``name`` with ``record`` and point .metadata at them;
    ``as_bytes`` also declares those entries pickled objects (DCP loads those with weights_only=False)."""
    meta = pickle.loads((dcp_dir / ".metadata").read_bytes())  # our own pristine file
    mine = {index.fqn for index, info in meta.storage_data.items() if info.relative_path == name}
    storage, offset = {}, 0
    for index, info in meta.storage_data.items():
        if as_bytes and index.fqn in mine:
            continue
        if info.relative_path == name:
            info = dataclasses.replace(info, offset=offset, length=len(record))
            offset += len(record)
        storage[index] = info
    if as_bytes:
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

        for fqn in sorted(mine):
            meta.state_dict_metadata[fqn] = BytesStorageMetadata()
            storage[MetadataIndex(fqn)] = dataclasses.replace(next(iter(meta.storage_data.values())),
                                                              relative_path=name, offset=offset, length=len(record))
            offset += len(record)
    meta.storage_data = storage
    (dcp_dir / name).write_bytes(record * (offset // len(record)))
    (dcp_dir / ".metadata").write_bytes(pickle.dumps(meta))


def plant(ckpt: Path, rel: str, kind: str, sentinel: Path) -> None:
    """Put an ``os.system`` payload of ``kind`` into the checkpoint file ``rel``."""
    path, payload = ckpt / rel, Payload(sentinel)
    if kind == "pickle":
        path.write_bytes(pickle.dumps(payload))
    elif rel.endswith(".distcp"):  # every record a torch.save'd payload; nested: declared as a pickled object
        rewrite_shard(path.parent, path.name, torch_saved(payload), as_bytes=kind == "nested")
    elif kind == "torch":
        path.write_bytes(torch_saved(payload))
    elif rel.endswith(".metadata"):  # real DCP metadata carrying a payload
        meta = pickle.loads(path.read_bytes())
        meta.planner_data = {"model/embed.weight": payload}
        path.write_bytes(pickle.dumps(meta))
    else:  # real content carrying a payload
        path.write_bytes(torch_saved({**torch.load(path, weights_only=True), "extra": [payload]}))


def restore_fresh(ckpt: Path):
    model = build_model(MODEL)
    return checkpoint.restore(ckpt, model, build_optimizer(OPTIM, model))


def export_in_process(run: Path, out: Path, capsys) -> tuple[int, str]:
    try:
        main([str(run), str(out)])
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def check_every_loader_refuses(run: Path, ckpt: Path, rel: str, sentinel: Path, capsys) -> None:
    with pytest.raises(CheckpointError) as err:
        restore_fresh(ckpt)
    assert "\n" not in str(err.value)
    if rel in MODEL_FILES:
        with pytest.raises(CheckpointError):
            checkpoint.load_model_state(ckpt)
    else:
        checkpoint.load_model_state(ckpt)  # does not read that file
    code, stderr = export_in_process(run, run.parent / "hf", capsys)
    if rel in MODEL_FILES:
        assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
        assert Path(rel).name in stderr or str(ckpt / "dcp") in stderr, stderr
    else:
        assert code == 0, stderr
    assert not sentinel.exists(), "the payload ran"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rel", SINGLE_FILES)
def test_single_process_layout_runs_no_payload(single_run, tmp_path, capsys, rel, kind):
    run, ckpt = copy_run(single_run, tmp_path)
    sentinel = tmp_path / "pwned"
    plant(ckpt, rel, kind, sentinel)
    check_every_loader_refuses(run, ckpt, rel, sentinel, capsys)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rel", SHARDED_FILES)
def test_sharded_layout_runs_no_payload(sharded_run, tmp_path, capsys, rel, kind):
    run, ckpt = copy_run(sharded_run, tmp_path)
    sentinel = tmp_path / "pwned"
    plant(ckpt, rel, kind, sentinel)
    check_every_loader_refuses(run, ckpt, rel, sentinel, capsys)


@pytest.mark.dist
@pytest.mark.slow
def test_sharded_refusal_names_the_pickle_global(sharded_run, tmp_path):
    run, ckpt = copy_run(sharded_run, tmp_path)
    plant(ckpt, "dcp/.metadata", "nested", tmp_path / "pwned")
    with pytest.raises(CheckpointError, match=r"\.metadata: refused: pickle global posix\.system is not "
                                              r"checkpoint metadata$"):
        checkpoint.load_model_state(ckpt)


@pytest.mark.dist
@pytest.mark.slow
def test_clean_sharded_checkpoint_still_loads(sharded_run, single_run, tmp_path, capsys):
    """The allow-list accepts real FSDP metadata (DTensor chunks): restore and export work."""
    run, ckpt = copy_run(sharded_run, tmp_path)
    state = checkpoint.load_model_state(ckpt)
    assert sorted(state) == sorted(build_model(MODEL).state_dict())
    assert restore_fresh(ckpt)["step"] == 1
    assert export_in_process(run, tmp_path / "hf", capsys)[0] == 0
    assert (tmp_path / "hf" / "config.json").is_file()


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("rel", ["dcp/.metadata", "dcp/__1_0.distcp"])
def test_export_cli_refuses_in_one_line(sharded_run, tmp_path, rel):
    run, ckpt = copy_run(sharded_run, tmp_path)
    sentinel = tmp_path / "pwned"
    plant(ckpt, rel, "nested", sentinel)
    proc = subprocess.run([sys.executable, "-m", "llmtrain.export", str(run), str(tmp_path / "hf")], cwd=REPO,
                          env=torchrun_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert not sentinel.exists()


def point_outside(meta) -> None:
    meta.storage_data = {k: dataclasses.replace(v, relative_path="../../secret") for k, v in meta.storage_data.items()}


def untyped_dtype(meta) -> None:
    meta.state_dict_metadata["model/w"].properties.dtype = "float32"


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("damage,message", [(point_outside, "points outside the checkpoint directory"),
                                            (untyped_dtype, "has no tensor dtype and size")])
def test_malformed_metadata_is_refused(tmp_path, damage, message):
    from torch.distributed.checkpoint import FileSystemWriter, save

    ckpt = tmp_path / "step_1"
    save({"model/w": torch.ones(3)}, storage_writer=FileSystemWriter(str(ckpt / "dcp")), no_dist=True)
    (ckpt / "COMPLETE").write_text("step 1\n")
    meta = pickle.loads((ckpt / "dcp" / ".metadata").read_bytes())
    damage(meta)
    (ckpt / "dcp" / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load_model_state(ckpt)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_planner_refuses_pickled_entries_even_with_unchecked_metadata(tmp_path):
    """Defence in depth: the load planner itself never unpickles a DCP byte entry."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    from llmtrain.checkpoint_safety import TensorOnlyLoadPlanner

    dcp_dir = tmp_path / "dcp"
    dcp.save({"model/w": torch.ones(3)}, storage_writer=dcp.FileSystemWriter(str(dcp_dir)), no_dist=True)
    sentinel = tmp_path / "pwned"
    rewrite_shard(dcp_dir, "__0_0.distcp", torch_saved(Payload(sentinel)), as_bytes=True)
    with pytest.raises(CheckpointException) as err:  # raw dcp.load gathers each rank's exception
        dcp.load({"model/w": torch.empty(3)}, storage_reader=dcp.FileSystemReader(str(dcp_dir)),
                 planner=TensorOnlyLoadPlanner(), no_dist=True)
    [(refusal, _)] = err.value.failures.values()
    assert isinstance(refusal, CheckpointError) and "'model/w' is not a tensor" in str(refusal)
    index = MetadataIndex("model/w")
    item = ReadItem(LoadItemType.BYTE_IO, index, torch.Size([0]), index, torch.Size([0]), torch.Size([0]))
    with pytest.raises(CheckpointError, match="not a tensor"):  # a byte item that reached the reader
        TensorOnlyLoadPlanner().load_bytes(item, io.BytesIO(torch_saved(Payload(sentinel))))
    assert not sentinel.exists()


# ---------------------------------------------------------------------------------------------
# model.init_from: a Hugging Face folder
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def hf_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "hf"
    to_hf(build_model(MODEL)).save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", KINDS)
def test_init_from_hf_bin_runs_no_payload(hf_dir, tmp_path, kind):
    sentinel = tmp_path / "pwned"
    (hf_dir / "model.safetensors").unlink()
    payload = Payload(sentinel)
    blob = {"pickle": pickle.dumps(payload), "torch": torch_saved(payload),
            "nested": torch_saved({"model.norm.weight": torch.ones(64), "extra": payload})}[kind]
    (hf_dir / "pytorch_model.bin").write_bytes(blob)
    with pytest.raises(CheckpointError, match="pytorch_model.bin") as err:
        load_init_weights(build_model(MODEL), hf_dir)
    assert "\n" not in str(err.value)
    assert not sentinel.exists()


def test_init_from_hf_damaged_safetensors_is_a_checkpoint_error(hf_dir, tmp_path):
    sentinel = tmp_path / "pwned"
    (hf_dir / "model.safetensors").write_bytes(pickle.dumps(Payload(sentinel)))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_init_weights(build_model(MODEL), hf_dir)
    assert not sentinel.exists()


@pytest.mark.parametrize("model_type", ["llama", "evil"])
def test_init_from_hf_never_runs_the_folders_own_code(hf_dir, tmp_path, model_type):
    """``auto_map`` code in the folder is never imported (transformers would ask on a terminal)."""
    sentinel = tmp_path / "pwned"
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                   "AutoModelForCausalLM": "modeling_evil.EvilModel"})
    (hf_dir / "config.json").write_text(json.dumps(config))
    code = f"import os\nos.system(\"touch '{sentinel}'\")\nfrom transformers import LlamaConfig as EvilConfig\n"
    (hf_dir / "configuration_evil.py").write_text(code)
    (hf_dir / "modeling_evil.py").write_text(code.replace("LlamaConfig as EvilConfig", "LlamaForCausalLM as EvilModel"))
    model = build_model(MODEL)
    if model_type == "llama":  # transformers' own class serves it
        load_init_weights(model, hf_dir)
    else:
        with pytest.raises(CheckpointError, match="custom code"):
            load_init_weights(model, hf_dir)
    assert not sentinel.exists()
