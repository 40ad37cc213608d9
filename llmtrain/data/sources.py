"""Corpus sources: resolve ``data.sources`` entries to files and iterate their documents as text.

A source is ``{path, weight, text_field, type, ...}`` (or just a path string). ``type`` is inferred
from the extension when omitted: ``.txt`` (one document per file, or
pieces split at ``doc_separator``), ``.jsonl`` / ``.json`` (one
document per record, text under ``text_field``), ``.parquet`` / ``.arrow`` (one per row of the
``text_field`` column). ``type: hf`` streams a Hugging Face dataset by name (or a local dataset
folder). A folder written by ``datasets``' ``save_to_disk`` is ``type: hf_disk`` (inferred from its
``state.json`` / ``dataset_dict.json``; ``split`` picks a DatasetDict's split). ``path`` may be a file,
a glob or a folder (every file of a known type inside it).
An empty ``data.sources`` means the Shakespeare default.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generator, Iterator, Optional

from llmtrain.errors import ConfigError, DataError, UnreachableError, choices

EXTENSIONS = {".txt": "txt", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
TYPES = ("txt", "jsonl", "json", "parquet", "arrow", "hf", "hf_disk", "shakespeare")
SOURCE_KEYS = ("path", "weight", "text_field", "type", "name", "split", "revision", "max_documents", "doc_separator",
               "tokens")


@dataclass
class SourceSpec:
    """One resolved source. ``weight`` None means 'its natural share' (see loader mixing)."""

    path: str
    type: str
    weight: Optional[float] = None
    text_field: str = "text"
    name: Optional[str] = None           # hf: dataset config name
    split: str = "train"                 # hf, hf_disk: which split to stream
    revision: Optional[str] = None       # hf: pin a dataset revision
    max_documents: Optional[int] = None  # stop after this many documents (any type)
    doc_separator: Optional[str] = None  # txt: split each file into documents at this string
    tokens: Optional[float] = None       # the source's size in tokens as its dataset card states it (an estimate
                                         # for planning before preparation; the prepared count replaces it)
    files: list[Path] = field(default_factory=list)

    def fingerprint(self) -> dict[str, Any]:
        """What the prepared data depends on. Weight is left out: it only changes sampling."""
        fp: dict[str, Any] = {
            "type": self.type, "path": self.path, "text_field": self.text_field,
            "max_documents": self.max_documents,
        }
        if self.type == "hf":
            fp.update(name=self.name, split=self.split, revision=self.revision)
        else:
            if self.type == "hf_disk":
                fp["split"] = self.split
            # size + mtime instead of a content hash: instant on huge corpora, and any edit changes one.
            fp["files"] = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in self.files]
        return fp


def _files_for(path: str, key: str, explicit_type: Optional[str]) -> list[Path]:
    expanded = os.path.expanduser(path)
    matches = sorted(glob.glob(expanded, recursive=True)) if glob.has_magic(expanded) else (
        [expanded] if os.path.exists(expanded) else [])
    if not matches:
        raise DataError(path, "no such file" + (" (glob matched nothing)" if glob.has_magic(expanded) else ""))
    files: list[Path] = []
    for m in matches:
        p = Path(m)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in EXTENSIONS)
        elif p.is_file():
            files.append(p)
    if not files:
        raise DataError(path, f"no files with a known extension ({', '.join(EXTENSIONS)}) under it")
    if explicit_type is None:
        for f in files:
            if f.suffix.lower() not in EXTENSIONS:
                raise ConfigError(f"{key}.type", f"cannot infer the type of {f}; set it, {choices(TYPES[:-1])}")
    return [f.resolve() for f in files]


def resolve_sources(sources: list[Any]) -> list[SourceSpec]:
    """Normalise ``data.sources`` into SourceSpecs; raises ConfigError/DataError naming the entry."""
    if not sources:
        from llmtrain.data.shakespeare import shakespeare_files

        return [SourceSpec(path="shakespeare", type="shakespeare", files=shakespeare_files())]
    specs = []
    for i, src in enumerate(sources):
        key = f"data.sources[{i}]"
        entry = {"path": src} if isinstance(src, (str, os.PathLike)) else dict(src)
        for k in entry:
            if k not in SOURCE_KEYS:
                raise ConfigError(f"{key}.{k}", f"unknown source key; expected {choices(SOURCE_KEYS)}")
        if not entry.get("path"):
            raise ConfigError(f"{key}.path", "each source needs a path (a file, glob, folder or dataset name)")
        kind = entry.get("type")
        if kind is not None and kind not in TYPES[:-1]:
            raise ConfigError(f"{key}.type", f"got {kind!r}, expected {choices(TYPES[:-1])}")
        weight = entry.get("weight")
        if weight is not None and (not isinstance(weight, (int, float)) or weight <= 0):
            raise ConfigError(f"{key}.weight", f"got {weight!r}, expected a number > 0")
        max_docs = entry.get("max_documents")
        if max_docs is not None and (not isinstance(max_docs, int) or max_docs <= 0):
            raise ConfigError(f"{key}.max_documents", f"got {max_docs!r}, expected an integer > 0")
        tokens = entry.get("tokens")
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, (int, float)) or tokens <= 0):
            raise ConfigError(f"{key}.tokens", f"got {tokens!r}, expected the source's size in tokens (a number > 0)")
        spec = SourceSpec(
            path=str(entry["path"]), type=kind or "", weight=None if weight is None else float(weight),
            text_field=str(entry.get("text_field") or "text"), name=entry.get("name"),
            split=str(entry.get("split") or "train"), revision=entry.get("revision"), max_documents=max_docs,
            doc_separator=entry.get("doc_separator") or None, tokens=None if tokens is None else float(tokens),
        )
        if kind in (None, "hf", "hf_disk") and is_saved_dataset(spec.path):
            spec.type, spec.files = "hf_disk", _saved_files(spec.path)
        elif kind == "hf_disk":
            raise DataError(spec.path, "not a datasets save_to_disk folder (no state.json or dataset_dict.json)")
        elif kind != "hf":
            spec.files = _files_for(spec.path, key, kind)
            if kind is None:
                kinds = {EXTENSIONS[f.suffix.lower()] for f in spec.files}
                spec.type = kinds.pop() if len(kinds) == 1 else "mixed"
        specs.append(spec)
    return specs


def is_saved_dataset(path: str) -> bool:
    """A folder ``datasets.save_to_disk`` wrote: a Dataset (state.json) or a DatasetDict (dataset_dict.json)."""
    folder = Path(path).expanduser()
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file())


def _saved_files(path: str) -> list[Path]:
    """Every file of a saved dataset (arrow and json): the fingerprint sees any rewrite."""
    return sorted(f.resolve() for f in Path(path).expanduser().rglob("*") if f.is_file())


def file_type(spec: SourceSpec, f: Path) -> str:
    return EXTENSIONS[f.suffix.lower()] if spec.type == "mixed" else ("txt" if spec.type == "shakespeare" else spec.type)


class BadUtf8:
    """Counts files/records skipped for invalid UTF-8, or raises, per ``data.on_bad_utf8``."""

    def __init__(self, policy: str):
        self.policy = policy
        self.skipped = 0
        self.first: Optional[str] = None

    def decode(self, raw: bytes, where: str) -> Optional[str]:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            if self.policy == "error":
                raise DataError(where, f"not valid UTF-8 (byte {err.start}); set data.on_bad_utf8=skip to skip it") from None
            self.skipped += 1
            self.first = self.first or where
            return None


def _decode_uncounted(raw: bytes) -> Optional[str]:
    """For input an interrupted preparation already read: its bad UTF-8 is in the restored counts."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _text_of(record: Any, spec: SourceSpec, where: str) -> str:
    if isinstance(record, str) and spec.type != "hf":
        return record
    if not isinstance(record, dict) or spec.text_field not in record:
        raise DataError(where, f"record has no {spec.text_field!r} field; set text_field on this source")
    text = record[spec.text_field]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise DataError(where, f"field {spec.text_field!r} is {type(text).__name__}, expected a string")
    return text


def _iter_jsonl(f: Path, spec: SourceSpec, utf8: BadUtf8, skip: int = 0) -> Generator[str, None, int]:
    """Documents after the first ``skip``; returns how many of ``skip`` are left for the next file."""
    with open(f, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            if skip:  # consumed by an interrupted preparation: counted, not parsed
                if _decode_uncounted(raw) is not None:
                    skip -= 1
                continue
            where = f"{f}:{lineno}"
            line = utf8.decode(raw, where)
            if line is None:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(where, f"invalid JSON ({err.msg})") from None
            yield _text_of(record, spec, where)
    return skip


def _iter_json(f: Path, spec: SourceSpec, utf8: BadUtf8, skip: int = 0) -> Generator[str, None, int]:
    raw = f.read_bytes()
    text = _decode_uncounted(raw) if skip else utf8.decode(raw, str(f))
    if text is None:
        return skip
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(str(f), f"invalid JSON at line {err.lineno} ({err.msg}); JSON Lines files need the .jsonl extension") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]  # the {"data": [...]} layout datasets' to_json(lines=False) can write
    if not isinstance(data, list):
        raise DataError(str(f), "expected a JSON array of records (or {\"data\": [...]})")
    for idx in range(skip, len(data)):
        yield _text_of(data[idx], spec, f"{f}[{idx}]")
    return max(skip - len(data), 0)


def _iter_txt(f: Path, spec: SourceSpec, utf8: BadUtf8, skip: int = 0) -> Generator[str, None, int]:
    raw = f.read_bytes()
    text = _decode_uncounted(raw) if skip else utf8.decode(raw, str(f))
    if text is None:
        return skip
    docs = [doc for doc in text.split(spec.doc_separator) if doc.strip()] if spec.doc_separator else [text]
    yield from docs[skip:]
    return max(skip - len(docs), 0)


def _iter_table(f: Path, kind: str, spec: SourceSpec, skip: int = 0) -> Generator[str, None, int]:
    """Rows of the text column; skipped rows are counted from the file's metadata, never decoded."""
    import pyarrow as pa
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    try:
        if kind == "parquet":
            pf = pq.ParquetFile(f)
            if spec.text_field not in pf.schema_arrow.names:
                raise DataError(str(f), f"no column {spec.text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); set text_field")
            groups = list(range(pf.num_row_groups))
            while skip and groups and pf.metadata.row_group(groups[0]).num_rows <= skip:
                skip -= pf.metadata.row_group(groups.pop(0)).num_rows
            batches = pf.iter_batches(columns=[spec.text_field], batch_size=1024, row_groups=groups)
        else:
            try:
                reader = ipc.open_file(f)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
                names = reader.schema.names
            except pa.ArrowInvalid:
                reader = ipc.open_stream(f)  # datasets' save_to_disk writes the streaming format
                batches, names = iter(reader), reader.schema.names
            if spec.text_field not in names:
                raise DataError(str(f), f"no column {spec.text_field!r} (columns: {', '.join(names)}); set text_field")
        for batch in batches:
            if skip:
                if skip >= batch.num_rows:
                    skip -= batch.num_rows
                    continue
                batch, skip = batch.slice(skip), 0
            for text in batch.column(batch.schema.get_field_index(spec.text_field)).to_pylist():
                if text is not None and not isinstance(text, str):
                    raise DataError(str(f), f"column {spec.text_field!r} holds {type(text).__name__}, expected strings")
                yield text or ""
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(str(f), f"cannot read as {kind}: {str(err).splitlines()[0]}") from None
    return skip


def _iter_hf(spec: SourceSpec, skip: int = 0) -> Iterator[str]:
    from llmtrain.data.hub import hub_reachable

    if not Path(spec.path).expanduser().exists() and not hub_reachable():
        raise UnreachableError(spec.path, f"cannot stream this Hugging Face dataset: the hub is unreachable (offline?); "
                              f"point data.sources at a local copy (parquet/jsonl files or a save_to_disk folder), "
                              f"e.g. data.sources='[{{path: /data/{spec.path.split('/')[-1]}, text_field: {spec.text_field}}}]'")
    try:
        import datasets

        ds = datasets.load_dataset(spec.path, spec.name, split=spec.split, streaming=True, revision=spec.revision)
        rows = iter(ds.skip(skip) if skip else ds)
        for idx, row in enumerate(rows, start=skip):
            yield _text_of(row, spec, f"{spec.path}[{idx}]")
    except DataError:
        raise
    except Exception as err:  # network, unknown dataset, bad split: all one user-facing line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UnreachableError(spec.path, f"cannot stream Hugging Face dataset ({first}); is the hub reachable?") from None


def _iter_saved(spec: SourceSpec, skip: int = 0) -> Iterator[str]:
    """Rows of a ``save_to_disk`` folder, memory-mapped by ``load_from_disk`` and read in batches."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(Path(spec.path).expanduser()))
    except Exception as err:  # damaged arrow or json: one line naming the folder
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(spec.path, f"cannot load with datasets.load_from_disk ({first[:200]})") from None
    if isinstance(ds, datasets.DatasetDict):
        if spec.split not in ds:
            raise DataError(spec.path, f"no split {spec.split!r} (splits: {', '.join(ds)}); set split on this source")
        ds = ds[spec.split]
    if spec.text_field not in ds.column_names:
        raise DataError(spec.path, f"no column {spec.text_field!r} (columns: {', '.join(ds.column_names)}); "
                                   f"set text_field")
    ds = ds.select_columns([spec.text_field]).with_format(None)
    if skip:
        ds = ds.select(range(min(skip, len(ds)), len(ds)))  # a contiguous range: a slice, no index mapping
    rows = (text for batch in ds.iter(batch_size=1024) for text in batch[spec.text_field])
    for idx, text in enumerate(rows, start=skip):
        yield _text_of({spec.text_field: text}, spec, f"{spec.path}[{idx}]")


def iter_documents(spec: SourceSpec, utf8: BadUtf8, skip: int = 0) -> Iterator[str]:
    """Every document of a source, in a fixed order (files sorted, records in file order).

    ``skip``: leave out the first ``skip`` documents, which an interrupted preparation already
    tokenized: they are counted as cheaply as the format allows (rows from table metadata, lines
    without JSON parsing) and their bad UTF-8 is not counted again in ``utf8``.
    """
    def all_docs() -> Iterator[str]:
        if spec.type in ("hf", "hf_disk"):
            yield from (_iter_hf if spec.type == "hf" else _iter_saved)(spec, skip)
            return
        left = skip
        for f in spec.files:
            kind = file_type(spec, f)
            if kind in ("txt", "jsonl", "json"):
                left = yield from {"txt": _iter_txt, "jsonl": _iter_jsonl, "json": _iter_json}[kind](f, spec, utf8, left)
            else:
                left = yield from _iter_table(f, kind, spec, left)

    for n, doc in enumerate(all_docs(), start=skip):
        if spec.max_documents is not None and n >= spec.max_documents:
            return
        yield doc
