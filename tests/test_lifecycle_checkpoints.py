"""Checkpoints that survive: a manifest of sizes and hashes, fsync before the marker and after the
rename, damaged checkpoints set aside with a fallback, interrupted writes adopted or cleaned, and
failures (unwritable directory, no space, a full disk mid-save) reported at once in one line."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from llmtrain import checkpoint, checkpoint_store
from llmtrain.errors import CheckpointError, ResourceError, UserError

from test_lifecycle_lineage import steps
from test_lifecycle_resume import rows, trainer


def test_manifest_lists_every_file_with_size_and_sha256(corpus, data_cache, tmp_path):
    run = tmp_path / "run"
    trainer(corpus, data_cache, run).fit()
    ckpt = run / "checkpoints" / "step_4"
    manifest = json.loads((ckpt / "COMPLETE").read_text())
    assert manifest["step"] == 4
    assert sorted(manifest["files"]) == ["config.yaml", "model.pt", "optim.pt", "trainer.pt"]
    for rel, entry in manifest["files"].items():
        data = (ckpt / rel).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_files_are_fsynced_before_the_marker_and_the_rename_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", str(a), str(b))), real_rename(a, b)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), real_replace(a, b)))
    tensor = {"w": torch.ones(3)}
    final = checkpoint.save_checkpoint(tmp_path, 1, tensor, {"state": {}, "param_groups": []}, {"step": 1}, keep=2)
    tmp = str(checkpoint_store.tmp_dir(tmp_path, 1))
    marker = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2].endswith("COMPLETE"))
    for name in ("model.pt", "optim.pt", "trainer.pt"):
        assert any(e == ("fsync", f"{tmp}/{name}") for e in events[:marker]), name
    rename = events.index(("rename", tmp, str(final)))
    assert rename > marker
    assert ("fsync", str(final.parent)) in events[rename:]


def test_resaving_a_step_renames_the_old_copy_aside_first(tmp_path, monkeypatch):
    checkpoint.save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, {"state": {}, "param_groups": []}, {"step": 1})
    real_rename = os.rename

    def crash_between(a, b):
        real_rename(a, b)
        if str(a).endswith("/step_1"):  # the old copy went aside: crash before the new one is renamed in
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "rename", crash_between)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {"state": {}, "param_groups": []}, {"step": 1})
    monkeypatch.setattr(os, "rename", real_rename)
    assert not (tmp_path / "checkpoints" / "step_1").exists()
    notes = checkpoint_store.adopt_and_clean(tmp_path)  # the next start: the complete new copy is adopted
    assert any("adopted step_1" in n for n in notes)
    assert torch.equal(checkpoint.load_model_state(tmp_path / "checkpoints" / "step_1")["w"], torch.ones(2))
    assert not list((tmp_path / "checkpoints").glob(".*"))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _rewrite_with_manifest(ckpt: Path, name: str, obj) -> None:
    """Replace a file and update the manifest: damage a hash cannot see."""
    torch.save(obj, ckpt / name)
    manifest = json.loads((ckpt / "COMPLETE").read_text())
    manifest["files"].update(checkpoint_store.hash_files(ckpt, [name]))
    (ckpt / "COMPLETE").write_text(json.dumps(manifest))


DAMAGE = {
    "truncated model.pt": (lambda c: (c / "model.pt").write_bytes((c / "model.pt").read_bytes()[:100]),
                           "model.pt has 100 bytes"),
    "flipped byte in optim.pt": (lambda c: _flip_byte(c / "optim.pt"), "damaged: hash mismatch in optim.pt"),
    "missing trainer.pt": (lambda c: (c / "trainer.pt").unlink(), "damaged: trainer.pt is missing"),
    "empty-dict trainer.pt": (lambda c: _rewrite_with_manifest(c, "trainer.pt", {}), "damaged: trainer.pt lacks step"),
    "garbage model.pt, old marker": (lambda c: ((c / "model.pt").write_bytes(b"garbage" * 99),
                                               (c / "COMPLETE").write_text("step 4\n")), "damaged: not a loadable weights file"),
    "unreadable marker": (lambda c: (c / "COMPLETE").write_text("{not json"), "unreadable COMPLETE marker"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_resume_sets_a_damaged_checkpoint_aside_and_uses_the_one_before(corpus, data_cache, tmp_path, capsys, damage):
    run = tmp_path / "run"
    trainer(corpus, data_cache, run).fit()
    apply, why = DAMAGE[damage]
    apply(run / "checkpoints" / "step_4")
    capsys.readouterr()
    t = trainer(corpus, data_cache, run, **{"train.max_steps": 6})
    assert t.step == 2
    warning = next(line for line in capsys.readouterr().out.splitlines() if "step_4 is" in line)
    assert why in warning and "moved to" in warning
    (aside,) = (run / "abandoned").glob("*damaged-step_4")
    assert (aside / "checkpoints" / "step_4").is_dir()
    assert steps(run) == [2]
    t.fit()
    assert steps(run) == [2, 4, 6]


def test_a_damaged_checkpoint_named_by_the_user_is_an_error_and_stays(corpus, data_cache, tmp_path):
    run = tmp_path / "run"
    trainer(corpus, data_cache, run).fit()
    _flip_byte(run / "checkpoints" / "step_2" / "model.pt")
    with pytest.raises(CheckpointError, match=r"^resume: .*step_2: damaged: hash mismatch in model.pt$"):
        trainer(corpus, data_cache, run, resume=f"'{run / 'checkpoints' / 'step_2'}'")
    assert steps(run) == [2, 4]


def test_when_every_checkpoint_is_damaged_nothing_starts_silently_from_scratch(corpus, data_cache, tmp_path):
    run = tmp_path / "run"
    trainer(corpus, data_cache, run).fit()
    for step in (2, 4):
        _flip_byte(run / "checkpoints" / f"step_{step}" / "model.pt")
    with pytest.raises(CheckpointError, match="every checkpoint .* is damaged"):
        trainer(corpus, data_cache, run, **{"train.max_steps": 6})
    assert steps(run) == []
    assert trainer(corpus, data_cache, run, **{"train.max_steps": 6}).step == 0  # a new line, as the error said


def test_a_complete_tmp_checkpoint_is_adopted_and_stale_ones_cleaned(corpus, data_cache, tmp_path, capsys):
    run = tmp_path / "run"
    trainer(corpus, data_cache, run).fit()
    root = run / "checkpoints"
    os.rename(root / "step_4", root / ".tmp_step_4")  # crashed after its marker, before its rename
    (root / ".tmp_step_6").mkdir()                   # crashed mid-write
    (root / ".tmp_step_6" / "model.pt").write_bytes(b"partial")
    t = trainer(corpus, data_cache, run, **{"train.max_steps": 6})
    assert t.step == 4
    out = capsys.readouterr().out
    assert "adopted step_4" in out and "removed .tmp_step_6" in out
    assert sorted(p.name for p in root.iterdir()) == ["step_2", "step_4"]


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path):
    for step in (5, 3):  # written out of order (a rolled-back line restarted below an old number)
        final = checkpoint.save_checkpoint(tmp_path, step, {"w": torch.ones(1)}, {"state": {}, "param_groups": []},
                                           {"step": step}, keep=1)
    assert final.is_dir() and final.name == "step_3"


def test_checkpoints_path_that_is_a_file_fails_before_any_step(corpus, data_cache, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("not a directory")
    with pytest.raises(ResourceError, match=r"^run_dir: cannot write checkpoints to .*checkpoints"):
        trainer(corpus, data_cache, run)
    assert not (run / "metrics.jsonl").exists()


def test_too_little_free_space_fails_before_any_step(corpus, data_cache, tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1000))
    with pytest.raises(ResourceError, match=r"^train.keep_checkpoints: .* 3 more checkpoint\(s\) of ~0.00 GiB"):
        trainer(corpus, data_cache, run, **{"train.keep_checkpoints": 2})
    assert not (run / "metrics.jsonl").exists()


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(corpus, data_cache, tmp_path,
                                                                                 monkeypatch):
    run = tmp_path / "run"
    t = trainer(corpus, data_cache, run, **{"train.max_steps": 6})
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if t.step == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(ResourceError) as err:
        t.fit()
    message = str(err.value)
    assert message.startswith("checkpoints: saving step_4 failed: No space left on device")
    assert "step_2 is untouched" in message and "\n" not in message
    assert steps(run) == [2] and checkpoint_store.verify(run / "checkpoints" / "step_2") is None
    assert not list((run / "checkpoints").glob(".tmp*"))
    assert json.loads((run / "summary.json").read_text())["status"] == "failed"


def test_the_final_checkpoint_is_written_before_the_final_eval(corpus, data_cache, tmp_path, monkeypatch):
    run = tmp_path / "run"
    t = trainer(corpus, data_cache, run, **{"train.eval_every": 2})

    def killed(*_):
        if t.step == 4:
            raise KeyboardInterrupt  # killed during the final eval
        return 5.0

    monkeypatch.setattr(t, "evaluate", killed)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    assert steps(run) == [2, 4]
    before = [r for r in rows(run) if "loss" in r]
    summary = trainer(corpus, data_cache, run, **{"train.eval_every": 2}).fit()  # finishes: eval + summary only
    assert summary["status"] == "completed" and summary["steps"] == 4
    assert [r for r in rows(run) if "loss" in r] == before
    assert rows(run)[-1]["step"] == 4 and "val_loss" in rows(run)[-1]


def test_device_values_are_checked(corpus, data_cache, tmp_path):
    with pytest.raises(UserError, match="^train.device: got 'gpu', expected auto, cpu, cuda or cuda:N$"):
        trainer(corpus, data_cache, tmp_path / "a", **{"train.device": "gpu"})
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="^train.device: got 'cuda:1' but no CUDA GPU is visible"):
            trainer(corpus, data_cache, tmp_path / "b", **{"train.device": "cuda:1"})
