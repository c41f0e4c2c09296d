"""Raw documents of a domain: local jsonl / jsonl.zst / parquet / txt files or globs, or a HF dataset.

Every reader yields the domain's non-empty document texts in a fixed order (config order of ``paths``,
each glob's matches sorted, file order within a file), so preparation is deterministic. Bad input is a
``ValueError`` (or ``FileNotFoundError``) naming the domain, the file and the line or row:

* a path or glob that matches nothing, or a file whose format the extension does not tell;
* a jsonl line that is not JSON or not an object (``file:line``), or not valid UTF-8;
* a missing text field or filter column (the message lists the fields or columns that were seen), or a
  text that is not a string.

Formats: ``jsonl`` is one JSON object per line (blank lines are skipped); ``jsonl.zst`` the same,
zstandard-compressed; ``parquet`` reads only the text and filter columns; ``txt`` is one document per
file. ``text_field`` and ``filter_column`` may be dotted (``meta.pile_set_name``) to reach into nested
objects or struct columns, for files and Hugging Face datasets alike. Domains that read the same source
and differ only in ``filter_value`` (``group_key``) are served by one pass (``iter_routed_documents``).
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from envs.config import DomainConfig, SourceConfig

log = logging.getLogger(__name__)

_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".zst": "jsonl.zst", ".parquet": "parquet", ".txt": "txt"}


def resolve_files(domain: DomainConfig) -> list[tuple[Path, str]]:
    """The files of a ``kind: files`` domain with their formats, in config order, each glob sorted.

    Raises:
        FileNotFoundError: a path does not exist or a glob matches no file.
        IsADirectoryError: a path (not a glob) is a directory.
        ValueError: the format of a file cannot be told from its extension.
    """
    src = domain.source
    files: list[tuple[Path, str]] = []
    for pattern in src.paths:
        if glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"domain {domain.name!r}: the glob {pattern!r} matches no file")
        else:
            if os.path.isdir(pattern):
                raise IsADirectoryError(
                    f"domain {domain.name!r}: source path {pattern!r} is a directory; expected a jsonl, "
                    f"jsonl.zst, parquet or txt file, or a glob such as {os.path.join(pattern, '*.jsonl')!r}"
                )
            if not os.path.isfile(pattern):
                raise FileNotFoundError(f"domain {domain.name!r}: file {pattern!r} not found")
            matches = [Path(pattern)]
        files.extend((path, _file_format(domain.name, src, path)) for path in matches)
    return files


def _file_format(domain_name: str, src: SourceConfig, path: Path) -> str:
    if src.format != "auto":
        return src.format
    fmt = _EXTENSIONS.get(path.suffix)
    if fmt is None:
        raise ValueError(
            f"domain {domain_name!r}: cannot tell the format of {path} from its extension; use one of "
            f"{sorted(_EXTENSIONS)} or set source.format to one of jsonl, jsonl.zst, parquet, txt"
        )
    return fmt


def source_fingerprint(domain: DomainConfig) -> list[dict[str, Any]]:
    """What the domain's text is made of: per local file its path, size and mtime; for HF the dataset spec.

    A change here (a touched or replaced file, another dataset) makes ``prepare_corpus`` redo the domain.
    Hub datasets are fingerprinted by their spec only (name, config, split, files), not their content.
    """
    src = domain.source
    if src.kind == "files":
        return [_file_fingerprint(path) | {"format": fmt} for path, fmt in resolve_files(domain)]
    spec = {
        "kind": "hf",
        "hf_path": src.hf_path,
        "hf_name": src.hf_name,
        "hf_split": src.hf_split,
        "filter_column": src.filter_column,
        "filter_value": src.filter_value,
        "text_field": src.text_field,
        "max_documents": src.max_documents,
    }
    data_files: list[dict[str, Any]] = []
    for pattern in src.hf_data_files:
        local = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if local:
            data_files.extend(_file_fingerprint(Path(p)) for p in local)
        else:  # a hub path or remote URL: only its name
            data_files.append({"path": pattern})
    return [spec | {"data_files": data_files}]


def _file_fingerprint(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def group_key(domain: DomainConfig) -> str | None:
    """Domains with equal keys share one source read once (the source up to ``filter_value``).

    Splitting The Pile into 22 domains by ``meta.pile_set_name`` then costs one pass over the data,
    not 22. Domains without ``filter_column`` are never grouped (None).
    """
    src = domain.source
    if src.filter_column is None:
        return None
    return json.dumps(src.model_dump(mode="json", exclude={"filter_value", "max_documents"}), sort_keys=True)


def iter_documents(domain: DomainConfig) -> Iterator[str]:
    """Yield the domain's non-empty documents in a deterministic order (at most ``max_documents``)."""
    for _, text in iter_routed_documents([domain]):
        yield text


def iter_routed_documents(domains: list[DomainConfig]) -> Iterator[tuple[int, str]]:
    """One pass over the source that ``domains`` share (equal ``group_key``): ``(i, text)`` per document.

    Rows go to every domain whose ``filter_value`` equals the row's ``filter_column`` (to all domains
    when there is no filter); empty texts are skipped; domain ``i`` takes at most its ``max_documents``,
    and the pass stops once every domain has its ``max_documents``. Each domain's documents come in
    source order, exactly as a pass for that domain alone would give them.
    """
    src = domains[0].source
    label = f"domain {domains[0].name!r}" if len(domains) == 1 else f"domains {[d.name for d in domains]}"
    routes: dict[Any, list[int]] = {}
    for i, d in enumerate(domains):
        routes.setdefault(d.source.filter_value, []).append(i)
    counts = [0] * len(domains)
    limits = [d.source.max_documents for d in domains]
    unfilled = len(domains)  # domains that still take documents (only max_documents can fill one)
    for record, place in _records(domains[0], label):
        if src.filter_column is None:
            targets = routes[None]
        else:
            found, value = get_dotted(record, src.filter_column)
            if not found:
                raise ValueError(
                    f"{label}: {place}: no filter column {src.filter_column!r}; fields seen: {_fields_seen(record)}"
                )
            targets = routes.get(value, ())
        text: str | None = None
        for i in targets:
            if limits[i] is not None and counts[i] >= limits[i]:
                continue
            if text is None:
                text = _text_of(record, src.text_field, f"domain {domains[i].name!r}: {place}")
            if not text.strip():
                break
            counts[i] += 1
            yield i, text
            if counts[i] == limits[i]:
                unfilled -= 1
                if unfilled == 0:
                    return


class _Place:
    """Where a record came from, formatted only when an error needs it (``file:line`` or ``...: row n``)."""

    __slots__ = ("prefix", "number")

    def __init__(self, prefix: str, number: int | str) -> None:
        self.prefix, self.number = prefix, number

    def __str__(self) -> str:
        return f"{self.prefix}{self.number}"


def _records(domain: DomainConfig, label: str) -> Iterator[tuple[dict[str, Any], _Place]]:
    src = domain.source
    if src.kind == "hf":
        yield from _hf_records(src, label)
        return
    for path, fmt in resolve_files(domain):
        if fmt == "jsonl":
            with open(path, "rb") as f:
                yield from _jsonl_records(label, path, f)
        elif fmt == "jsonl.zst":
            import zstandard

            with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as reader:
                yield from _jsonl_records(label, path, io.BufferedReader(reader))
        elif fmt == "parquet":
            yield from _parquet_records(src, label, path)
        else:
            if src.filter_column is not None:
                raise ValueError(
                    f"{label}: {path}: a txt file has no columns to filter by {src.filter_column!r}"
                )
            try:
                value: Any = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{label}: {path} is not valid UTF-8 text ({exc})") from None
            for part in reversed(src.text_field.split(".")):  # the whole file is the (dotted) text field
                value = {part: value}
            yield value, _Place(str(path), "")


def _jsonl_records(
    label: str, path: Path, lines: io.BufferedIOBase
) -> Iterator[tuple[dict[str, Any], _Place]]:
    prefix = f"{path}:"
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.rstrip(b"\r\n"))
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"{label}: {path}:{lineno}: not valid UTF-8 ({exc.reason} at byte {exc.start})"
            ) from None
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{label}: {path}:{lineno}: corrupt JSON line ({exc.msg} at column {exc.colno})"
            ) from None
        if not isinstance(record, dict):
            raise ValueError(
                f"{label}: {path}:{lineno}: expected a JSON object per line, got {type(record).__name__}"
            )
        yield record, _Place(prefix, lineno)


def _text_of(record: dict[str, Any], field: str, where: str) -> str:
    found, value = get_dotted(record, field)
    if not found:
        raise ValueError(
            f"{where}: no text field {field!r} (set source.text_field); fields seen: {_fields_seen(record)}"
        )
    if not isinstance(value, str):
        raise ValueError(f"{where}: text field {field!r} holds {type(value).__name__}, expected a string")
    return value


def get_dotted(record: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    """Look up ``a.b.c`` in nested dicts; returns (found, value)."""
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def _fields_seen(record: dict[str, Any], prefix: str = "") -> list[str]:
    fields: list[str] = []
    for key, value in record.items():
        fields.append(prefix + key)
        if isinstance(value, dict):
            fields.extend(_fields_seen(value, prefix + key + "."))
    return fields


def _needed_columns(src: SourceConfig) -> list[str]:
    """Top-level columns that hold the text and the filter (dotted names reach into struct columns)."""
    columns = [src.text_field.split(".")[0]]
    if src.filter_column is not None and src.filter_column.split(".")[0] not in columns:
        columns.append(src.filter_column.split(".")[0])
    return columns


def _check_columns(src: SourceConfig, where: str, columns: list[str]) -> None:
    for what, name in [("text field", src.text_field), ("filter column", src.filter_column)]:
        if name is not None and name.split(".")[0] not in columns:
            hint = " (set source.text_field)" if what == "text field" else ""
            raise ValueError(f"{where}: no {what} {name!r}{hint}; columns seen: {columns}")


def _parquet_records(src: SourceConfig, label: str, path: Path) -> Iterator[tuple[dict[str, Any], _Place]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid and friends on a damaged file
        raise ValueError(f"{label}: {path} is not a readable parquet file ({exc})") from None
    _check_columns(src, f"{label}: {path}", pf.schema_arrow.names)
    columns = _needed_columns(src)
    prefix, row = f"{path}: row ", 0
    for batch in pf.iter_batches(batch_size=1024, columns=columns):
        for record in batch.to_pylist():
            row += 1
            yield record, _Place(prefix, row)


def _hf_records(src: SourceConfig, label: str) -> Iterator[tuple[dict[str, Any], _Place]]:
    import datasets

    try:
        ds = datasets.load_dataset(
            src.hf_path,
            src.hf_name,
            split=src.hf_split,
            data_files=list(src.hf_data_files) or None,
            streaming=src.streaming,
        )
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{label}: Hugging Face dataset {src.hf_path!r}: {exc}") from None
    where = f"dataset {src.hf_path!r} ({src.hf_split})"
    if ds.column_names:  # known up front (not always when streaming): fail early, read only what we need
        _check_columns(src, f"{label}: {where}", list(ds.column_names))
        ds = ds.select_columns(_needed_columns(src))
    prefix = f"{where}: row "
    for row, record in enumerate(ds, start=1):
        yield record, _Place(prefix, row)


def empty_domain_error(domain: DomainConfig) -> ValueError:
    """The error for a domain whose source gave no non-empty document (names the files or dataset)."""
    src = domain.source
    where = f"files {list(src.paths)}" if src.kind == "files" else f"dataset {src.hf_path!r} ({src.hf_split})"
    if src.filter_column:
        where += f" where {src.filter_column} == {src.filter_value!r}"
    return ValueError(f"domain {domain.name!r} is empty: {where} gave no non-empty document")
