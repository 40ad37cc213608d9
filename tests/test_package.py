"""llmtrain as a package: what the wheel holds and declares, configs found from any install, a
user's config folder on top of them (--config-dir), extras that a run can do without, the image."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, tiny_overrides, torchrun_env

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _requirement_name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group(0)).lower()


def _declared(groups: tuple[str, ...] = ()) -> set[str]:
    """Normalised distribution names of the core dependencies plus the named extras."""
    extras = PYPROJECT["project"]["optional-dependencies"]
    reqs = PYPROJECT["project"]["dependencies"] + [r for g in groups for r in extras[g]]
    return {_requirement_name(r) for r in reqs}


def _third_party_imports(root: Path) -> dict[str, set[str]]:
    """Top-level module names imported anywhere in ``root`` (function bodies too) -> importing files."""
    found: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "llmtrain" and top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(str(path.relative_to(root.parent)))
    return found


# --- what the package declares ------------------------------------------------------------------

def test_every_third_party_import_is_a_declared_dependency():
    runtime_extras = tuple(g for g in PYPROJECT["project"]["optional-dependencies"] if g != "test")
    declared = _declared(runtime_extras)
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for module, files in _third_party_imports(REPO / "llmtrain").items():
        dists = {_requirement_name(d) for d in distributions.get(module, [module])}
        if not dists & declared:
            missing[module] = sorted(files)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_torch_floor_is_the_tested_torch():
    ci_pin = re.search(r'"torch==([0-9.]+)"', (REPO / ".ci" / "run").read_text()).group(1)
    readme_pins = set(re.findall(r'pip install "torch==([0-9.]+)"', (REPO / "README.md").read_text()))
    floor = [r for r in PYPROJECT["project"]["dependencies"] if _requirement_name(r) == "torch"]
    assert floor == [f"torch>={'.'.join(ci_pin.split('.')[:2])}"]
    assert readme_pins == {ci_pin}
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(rf"\bTORCH_VERSION={re.escape(ci_pin)}\b", dockerfile), "the image must install the tested torch"
    final_base = re.findall(r"^FROM (\S+)", dockerfile, re.M)[-1]
    assert "-devel" in final_base, f"{final_base}: kernels need a compiler and headers at run time"


def test_optional_extras_leave_torch_alone():
    """An extra that pinned torch would fight the CI pin; the image and users install torch themselves."""
    for group, reqs in PYPROJECT["project"]["optional-dependencies"].items():
        assert "torch" not in {_requirement_name(r) for r in reqs}, group


def test_listed_packages_are_the_source_tree():
    """``packages`` is an explicit list (configs/ is mapped in); a new subpackage must not fall out of the wheel."""
    setuptools_cfg = PYPROJECT["tool"]["setuptools"]
    in_tree = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "llmtrain").rglob("__init__.py")}
    assert set(setuptools_cfg["packages"]) == in_tree | {"llmtrain.configs"}
    assert setuptools_cfg["package-dir"] == {"llmtrain.configs": "configs"}
    assert (REPO / "configs" / "__init__.py").is_file(), "Hydra's pkg:// source lists only packages with __init__.py"


# --- configs: packaged, the environment variable, --config-dir ------------------------------------

def _user_configs(root: Path) -> Path:
    """A user's own config folder: one experiment and one model preset llmtrain does not ship."""
    (root / "experiment").mkdir(parents=True)
    (root / "model").mkdir()
    (root / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /optim: lion\n  - override /model: wee\n"
        "train:\n  max_steps: 3\n  eval_every: 3\n  seq_len: 32\n"
    )
    (root / "model" / "wee.yaml").write_text(
        "defaults:\n  - llama_tiny\n  - _self_\nn_layers: 2\nd_model: 64\nn_heads: 4\nn_kv_heads: 2\nmax_seq_len: 64\n"
    )
    return root


def test_compose_takes_a_user_config_dir_on_top(tmp_path):
    from llmtrain.cli import compose

    cfg = compose(["+experiment=mine"], user_config_dir=str(_user_configs(tmp_path / "mine")))
    assert (cfg.optim["name"], cfg.train.max_steps, cfg.model.n_layers, cfg.model.d_model) == ("lion", 3, 2, 64)
    assert cfg.data.name == "shakespeare"  # everything else still comes from llmtrain's configs


def test_llmtrain_config_dir_still_replaces_the_configs(tmp_path, monkeypatch):
    from llmtrain.cli import compose, config_dir
    from llmtrain.errors import ConfigError

    own = tmp_path / "configs"
    shutil.copytree(REPO / "configs", own)
    (own / "train.yaml").write_text((own / "train.yaml").read_text().replace("max_steps: 300", "max_steps: 42"))
    monkeypatch.setenv("LLMTRAIN_CONFIG_DIR", str(own))
    assert config_dir() == own
    assert compose([]).train.max_steps == 42
    monkeypatch.setenv("LLMTRAIN_CONFIG_DIR", str(tmp_path))
    with pytest.raises(ConfigError) as info:
        config_dir()
    assert info.value.key == "LLMTRAIN_CONFIG_DIR" and "train.yaml" in str(info.value)


@pytest.mark.parametrize("argv", [["--config-dir={dir}", "a=1"], ["--config-dir", "{dir}", "a=1"],
                                  ["-cd", "{dir}", "a=1"], ["-cd={dir}", "a=1"]])
def test_split_config_dir_takes_hydras_spellings(tmp_path, argv):
    from llmtrain.cli import split_config_dir

    assert split_config_dir([a.format(dir=tmp_path) for a in argv]) == (tmp_path, ["a=1"])


@pytest.mark.parametrize("argv", [["--config-dir={dir}/nope"], ["-cd", "{dir}/nope"], ["--config-dir"]])
def test_config_dir_that_is_not_a_folder(tmp_path, argv):
    from llmtrain.cli import split_config_dir
    from llmtrain.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        split_config_dir([a.format(dir=tmp_path) for a in argv])
    assert info.value.key == "--config-dir" and "not a folder" in str(info.value)


def test_prevalidate_composes_with_the_users_folder(tmp_path):
    from llmtrain.cli import prevalidate
    from llmtrain.errors import ConfigError

    user = _user_configs(tmp_path / "mine")
    prevalidate([f"--config-dir={user}", "+experiment=mine", "optim.lr=1e-3"])
    prevalidate(["-m", f"--config-dir={user}", "+experiment=mine", "optim.lr=1e-3,1e-4"])
    with pytest.raises(ConfigError) as info:
        prevalidate(["-cd", str(user), "+experiment=mien"])
    assert info.value.key == "experiment" and "mine" in str(info.value) and "tiny_shakespeare" in str(info.value)
    with pytest.raises(ConfigError) as info:
        prevalidate([f"--config-dir={user}", "+experiment=mine", "train.max_stepz=3"])
    assert info.value.key == "train.max_stepz"


def test_cli_config_dir_mistake_is_one_line_exit_2(tmp_path):
    user = _user_configs(tmp_path / "mine")
    result = subprocess.run([sys.executable, "-m", "llmtrain", "--config-dir", str(user), "+experiment=mien"],
                            cwd=tmp_path, env=torchrun_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: experiment: "), result.stderr


# --- extras: a run without them, and the error that names them ------------------------------------

_WITHOUT_EXTRAS = r"""
import importlib, importlib.util, pkgutil, sys
sys.modules["triton"] = None        # an import of either now raises ImportError, as if not installed
sys.modules["bitsandbytes"] = None
import torch
import llmtrain
from llmtrain.errors import ConfigError
from llmtrain.optim import OPTIMIZERS

for mod in pkgutil.walk_packages(llmtrain.__path__, "llmtrain."):
    path = importlib.util.find_spec(mod.name).origin
    if mod.name.startswith("llmtrain.optim.kernels.") and "\nimport triton" in open(path).read():
        continue  # kernel modules: imported only after triton_usable()/require_triton() said yes
    importlib.import_module(mod.name)

param = torch.nn.Parameter(torch.randn(64, 64))
for name in ("adamw8bit", "adamw", "lion"):
    opt = OPTIMIZERS[name]([param], lr=1e-3)  # impl=auto runs without either extra
    param.grad = torch.randn_like(param)
    opt.step()
for name, impl in (("adamw8bit", "bnb"), ("adamw8bit", "triton"), ("adamw", "triton"), ("lion", "triton")):
    try:
        opt = OPTIMIZERS[name]([param], lr=1e-3, impl=impl)
        param.grad = torch.randn_like(param)
        opt.step()
    except ConfigError as err:
        print(f"{name} {impl}: {err}")
    else:
        print(f"{name} {impl}: no error")
"""


@pytest.mark.slow
def test_a_run_without_the_optional_extras_and_the_errors_naming_them():
    env = {**torchrun_env(), "TRITON_INTERPRET": "1"}  # so impl=triton fails on triton missing, not on the CPU
    result = subprocess.run([sys.executable, "-c", _WITHOUT_EXTRAS], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert set(lines) == {"adamw8bit bnb", "adamw8bit triton", "adamw triton", "lion triton"}, result.stdout
    assert lines["adamw8bit bnb"].startswith("optim.impl: ") and 'pip install "llmtrain[bnb]"' in lines["adamw8bit bnb"]
    for key in ("adamw8bit triton", "adamw triton", "lion triton"):
        assert lines[key].startswith("optim.impl: ") and 'pip install "llmtrain[triton]"' in lines[key], lines[key]


# --- the wheel, installed into a fresh venv, run from elsewhere -----------------------------------

_IN_THE_VENV = r"""
import json, sys
from importlib.metadata import PackageNotFoundError, distribution, version
from packaging.requirements import Requirement
from hydra import compose, initialize_config_module
import llmtrain
from llmtrain.cli import config_dir

unmet = []
for req in map(Requirement, distribution("llmtrain").requires or []):
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # an extra's requirement, or another platform's
    try:
        have = version(req.name)
    except PackageNotFoundError:
        have = None
    if have is None or not req.specifier.contains(have, prereleases=True):
        unmet.append(f"{req} (installed: {have})")
with initialize_config_module("llmtrain.configs", version_base=None):  # Hydra's pkg://llmtrain.configs
    model = compose("model/llama_tiny").model.name
print(json.dumps({"package": llmtrain.__file__, "configs": str(config_dir()), "unmet": unmet, "pkg_model": model,
                  "torch_imported": "torch" in sys.modules}))
"""


def _copy_checkout(dest: Path) -> Path:
    """What the package is built from, copied: a build writes build/ and *.egg-info into its source."""
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    for name in ("llmtrain", "configs"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _build_wheel(out: Path, tmp: Path) -> Path:
    """The wheel of a copy of the checkout (an in-tree build would leave build/ behind, stale files and all)."""
    src = _copy_checkout(tmp / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "--wheel-dir", str(out), str(src)], check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = out.glob("llmtrain-*.whl")
    return wheel


def _venv_env(venv: Path) -> dict[str, str]:
    """The environment of a user of ``venv``: its bin/ first on PATH, nothing pointing at this checkout."""
    env = {k: v for k, v in torchrun_env().items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def _probe(python: Path, cwd: Path) -> dict:
    result = subprocess.run([str(python), "-c", _IN_THE_VENV], cwd=cwd, env=_venv_env(python.parent.parent),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def _fresh_venv(path: Path) -> Path:
    """A new venv that borrows this interpreter's installed dependencies (no download) through a .pth
    line; a .pth's path entries are appended after the venv's own site-packages and their .pth files
    (this checkout's editable install among them) are not run, so llmtrain comes from the venv only."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    python = path / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    borrowed = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                              *site.getsitepackages()])
    Path(purelib, "_borrowed_site_packages.pth").write_text("\n".join(borrowed) + "\n")
    return python


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_trains_from_another_directory(tmp_path, corpus):
    wheel = _build_wheel(tmp_path / "dist", tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"llmtrain/configs/{p.relative_to(REPO / 'configs')}" for p in (REPO / "configs").rglob("*.yaml")}
    modules = {str(p.relative_to(REPO)) for p in (REPO / "llmtrain").rglob("*.py")}
    assert shipped and shipped <= names and modules <= names, sorted((shipped | modules) - names)

    python = _fresh_venv(tmp_path / "venv")
    venv = python.parent.parent
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--ignore-installed", "--no-index",
                    str(wheel)], check=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    found = _probe(python, elsewhere)
    assert Path(found["package"]).is_relative_to(venv) and Path(found["configs"]).is_relative_to(venv), found
    assert found["unmet"] == [], "the wheel's requirements are not what CI tests with"
    assert (found["pkg_model"], found["torch_imported"]) == ("llama_tiny", False)

    user = _user_configs(tmp_path / "mine")
    args = [o for o in tiny_overrides(corpus, tmp_path, tmp_path) if o.split("=")[0] not in
            ("run_dir", "data.cache_dir", "train.max_steps", "train.eval_every", "optim.lr",
             "model.n_layers", "model.d_model", "model.n_heads", "model.n_kv_heads", "model.max_seq_len")]
    result = subprocess.run([str(venv / "bin" / "llmtrain"), f"--config-dir={user}", "+experiment=mine", *args],
                            cwd=elsewhere, env=_venv_env(venv), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (summary_path,) = elsewhere.glob("outputs/*/*/summary.json")  # Hydra's run dir, under the cwd
    summary = json.loads(summary_path.read_text())
    rows = [json.loads(line) for line in (summary_path.parent / "metrics.jsonl").read_text().splitlines()]
    assert summary["status"] == "completed" and summary["optimizer"] == "lion", summary
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert (elsewhere / "data_cache").is_dir()  # the corpus cache, relative to the cwd as configured


@pytest.mark.slow
def test_editable_install_runs_on_the_checkouts_configs(tmp_path):
    """``pip install -e``: the package, config_dir() and Hydra's pkg://llmtrain.configs are the checkout's."""
    src = _copy_checkout(tmp_path / "checkout")
    python = _fresh_venv(tmp_path / "venv")
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                    "--ignore-installed", "-e", str(src)], check=True, capture_output=True, timeout=300)
    found = _probe(python, tmp_path)
    assert (Path(found["package"]), Path(found["configs"])) == (src / "llmtrain" / "__init__.py", src / "configs")
    assert (found["unmet"], found["pkg_model"]) == ([], "llama_tiny")
