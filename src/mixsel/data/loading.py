"""Load multi-domain text data from files or Hugging Face ``datasets`` into normalised records.

A *record* is a plain ``dict`` with

* ``domain`` (str): the domain (mixture component) the example belongs to;
* either ``text`` (str): plain language-model data, the loss covers every token,
* or ``prompt`` + ``response`` (str): instruction data, only the response tokens are targets,
* or ``messages`` (a list of ``{"role", "content"}`` turns before the response) + ``response``
  (str): a conversation, only the last assistant turn is a target;
* optionally ``answer`` (str): a checkable final answer (exact-match evaluation),
* optionally ``split`` (``"train"``, ``"validation"`` or ``"test"``).

Sources understood by :func:`load_records`:

=================================  ===============================================================
source                             how it is read
=================================  ===============================================================
``*.jsonl``, ``*.jsonl.gz``,       one JSON object per line (``.json``: a JSON array or an
``*.json``, ``*.json.gz``          object of columns), read with the standard ``json`` module
``*.parquet``                      ``pyarrow.parquet.read_table``
``*.csv``, ``*.csv.gz``            ``pandas.read_csv`` (every cell read as a string)
a folder or a glob of such files   every matching file, in sorted path order
a ``Dataset.save_to_disk`` folder  ``datasets.load_from_disk``
``format="hf"`` + local files      ``datasets.load_dataset(<json|parquet|csv>, data_files=...)``
``format="hf"`` + a hub name       ``datasets.load_dataset(name, hf_config, split=hf_split)``
=================================  ===============================================================

Heavy libraries (pandas, pyarrow, ``datasets``) are imported inside the functions that need them.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import logging
import math
import os
import warnings
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mixsel.errors import DataError

__all__ = [
    "SPLITS",
    "domain_names",
    "iter_records",
    "load_records",
    "normalize_records",
    "select_domains",
    "split_records",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
}
_FORMATS = ("jsonl", "json", "parquet", "csv", "hf")
_SUFFIXES = {
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl",
    ".json": "json",
    ".json.gz": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".csv.gz": "csv",
}
_HF_BUILDERS = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}


# --------------------------------------------------------------------------------------------------
# reading raw rows
# --------------------------------------------------------------------------------------------------


def _file_format(path: str) -> str | None:
    lower = path.lower()
    for suffix, fmt in sorted(_SUFFIXES.items(), key=lambda kv: -len(kv[0])):
        if lower.endswith(suffix):
            return fmt
    return None


def _is_saved_dataset(path: str) -> bool:
    """True for a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, name)) for name in ("dataset_info.json", "state.json", "dataset_dict.json")
    )


def _expand_files(source: str) -> list[str]:
    """The data files named by ``source``: one file, every data file in a folder, or a glob."""
    if os.path.isfile(source):
        return [source]
    if os.path.isdir(source):
        files = sorted(
            os.path.join(root, name)
            for root, _dirs, names in os.walk(source)
            for name in names
            if _file_format(name) is not None and not name.startswith(".")
        )
        if not files:
            raise DataError(
                f"data folder {source!r} holds no .jsonl/.jsonl.gz/.json/.parquet/.csv files; "
                "point data.source at a file, a folder of such files, or a glob such as 'dir/*.jsonl'"
            )
        return files
    if glob.has_magic(source):
        files = sorted(f for f in glob.glob(source, recursive=True) if os.path.isfile(f))
        if not files:
            raise DataError(f"the glob data.source={source!r} matches no files; check the pattern")
        return files
    raise DataError(
        f"data.source={source!r} is not an existing file, folder or glob; give a local path, or set "
        "data.format=hf to load it as a Hugging Face hub dataset name"
    )


def _open_text(path: str) -> Any:
    return gzip.open(path, "rt", encoding="utf-8") if path.lower().endswith(".gz") else open(path, encoding="utf-8")


def _numbered(label: str, n: int) -> list[str]:
    """Source ids ``"<label>:<i>"`` of ``n`` rows, ``i`` counted from 0."""
    return [f"{label}:{i}" for i in range(n)]


def _label_base(source: str) -> str | None:
    """The folder that file labels are relative to: ``None`` for one file (its name is the label),
    the folder itself, or a glob's leading folders without wildcards."""
    if os.path.isfile(source):
        return None
    if os.path.isdir(source):
        return source
    head = source
    while glob.has_magic(head):
        head = os.path.dirname(head)
    return head or os.curdir


def _file_label(path: str, base: str | None) -> str:
    """How a source id names a data file: its path relative to ``base``, or its name."""
    if base is None:
        return os.path.basename(path)
    return os.path.relpath(path, base).replace(os.sep, "/")


def _undecodable(path: str, err: Exception) -> str:
    """One line for a data file that cannot be decoded: not UTF-8 (with the byte offset), or a damaged gzip."""
    if isinstance(err, UnicodeDecodeError):
        where = " of the decompressed text" if path.lower().endswith(".gz") else ""
        byte = err.object[err.start : err.start + 1].hex()
        return (
            f"data file {path} is not UTF-8 text (byte 0x{byte} at offset {err.start}{where}); "
            "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        )
    return f"data file {path} is a truncated or damaged gzip file ({err or type(err).__name__}); re-create it"


_CHUNK_ROWS = 10_000


def _json_lines(
    lines: Iterable[str], path: str, label: str, size: int
) -> Iterator[tuple[list[dict[str, Any]], list[str]]]:
    """Chunks of the rows of JSON lines and their ids ``"<label>:<1-based line>"``.

    Lines are those of Python's text files (``\\n``, ``\\r\\n`` or ``\\r``), so a U+2028 inside a
    string value does not split a row as ``str.splitlines`` would.
    """
    rows: list[dict[str, Any]] = []
    ids: list[str] = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}:{line_no} is not valid JSON ({err.msg}); each line must be one JSON object"
            ) from err
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line_no} is a JSON {type(row).__name__}, not an object with named columns")
        rows.append(row)
        ids.append(f"{label}:{line_no}")
        if len(rows) == size:
            yield rows, ids
            rows, ids = [], []
    if rows:
        yield rows, ids


def _json_chunks(path: str, fmt: str, label: str, size: int) -> Iterator[tuple[list[dict[str, Any]], list[str]]]:
    """Chunks of a JSON file's rows, read with the standard ``json`` module so values keep their exact
    types (pandas would turn an integer column with a null into floats: ``8`` -> ``"8.0"``), and their ids.

    ``.jsonl`` is one object per line (id ``"<label>:<1-based line number>"``), read line by line;
    ``.json`` is a JSON array of objects or an object of columns (id ``"<label>:<0-based row index>"``),
    or else one object per line (``datasets.Dataset.to_json`` writes lines).
    """
    if fmt == "jsonl":
        with _open_text(path) as f:
            yield from _json_lines(f, path, label, size)
        return
    with _open_text(path) as f:
        content = f.read()
    try:
        data = json.loads(content)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        keys = list(data)
        data = [dict(zip(keys, values)) for values in zip(*(data[k] for k in keys))]
    if isinstance(data, list):
        for start in range(0, len(data), size):
            yield (
                [dict(row) for row in data[start : start + size]],
                [f"{label}:{i}" for i in range(start, min(start + size, len(data)))],
            )
        return
    yield from _json_lines(io.StringIO(content), path, label, size)


def _file_chunks(path: str, fmt: str, label: str, size: int) -> Iterator[tuple[list[dict[str, Any]], list[str]]]:
    """Chunks of ``size`` rows of one data file and their source ids (``label`` names the file in them)."""
    if fmt in ("jsonl", "json"):
        yield from _json_chunks(path, fmt, label, size)
        return
    if fmt == "parquet":
        import pyarrow.parquet as pq

        start = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=size):
            rows = batch.to_pylist()
            yield rows, [f"{label}:{i}" for i in range(start, start + len(rows))]
            start += len(rows)
        return
    if fmt == "csv":
        import pandas as pd

        start = 0
        for frame in pd.read_csv(path, dtype=str, keep_default_na=False, compression="infer", chunksize=size):
            rows = frame.to_dict(orient="records")
            yield rows, [f"{label}:{i}" for i in range(start, start + len(rows))]
            start += len(rows)
        return
    raise DataError(f"unknown data.format={fmt!r}; use one of {', '.join(_FORMATS)}")


def _local_chunks(
    files: Sequence[str], fmt: str | None, base: str | None, size: int
) -> Iterator[tuple[list[dict[str, Any]], list[str]]]:
    """Chunks of the rows of the data files, in order, and their source ids (files named relative to ``base``)."""
    for path in files:
        file_fmt = fmt or _file_format(path)
        if file_fmt is None:
            raise DataError(
                f"cannot tell the format of {path!r} from its name; set data.format to one of "
                f"{', '.join(f for f in _FORMATS if f != 'hf')}"
            )
        try:
            yield from _file_chunks(path, file_fmt, _file_label(path, base), size)
        except (UnicodeDecodeError, EOFError, gzip.BadGzipFile, zlib.error) as err:
            raise DataError(_undecodable(path, err)) from None


def _hf_chunks(
    obj: Any, prefix: str, split_column: str | None, size: int
) -> Iterator[tuple[list[dict[str, Any]], list[str]]]:
    """Chunks of the rows of a ``datasets.Dataset`` or ``DatasetDict`` and their ids ``"<prefix>:<row>"``
    (a ``DatasetDict``'s ``"<prefix>:<split>:<row>"``). A dict with several splits is read split by
    split, each row tagged with its split's name in a ``__split__`` column unless ``split_column`` is
    set (:func:`hf_chunks` says which column then holds the split); a one-split dict is read untagged,
    so :func:`split_records` makes the splits."""
    import datasets

    if not isinstance(obj, datasets.DatasetDict):
        parts: list[tuple[Any, str, str | None]] = [(obj, prefix, None)]
    elif len(obj) == 1:
        name = next(iter(obj))
        parts = [(obj[name], f"{prefix}:{name}", None)]
    else:
        _split_names(obj, split_column)
        parts = [(obj[name], f"{prefix}:{name}", name if split_column is None else None) for name in obj]
    for dataset, label, tag in parts:
        for start in range(0, len(dataset), size):
            batch = dataset[start : start + size]
            keys = list(batch)
            rows = [dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys))]
            if tag is not None:
                for row in rows:
                    row["__split__"] = tag
            yield rows, [f"{label}:{i}" for i in range(start, start + len(rows))]


def hf_chunks(obj: Any, prefix: str, split_column: str | None, size: int) -> tuple[Any, str | None]:
    """A function returning a fresh iterator over :func:`_hf_chunks` of ``obj``, and the split column:
    ``"__split__"`` for a ``DatasetDict`` of several splits without a configured one.

    Raises:
        ValueError: such a dict has a split that is not train/validation/test (or an alias).
    """
    import datasets

    if isinstance(obj, datasets.DatasetDict) and len(obj) > 1 and split_column is None:
        _split_names(obj, None)
        return (lambda: _hf_chunks(obj, prefix, None, size)), "__split__"
    return (lambda: _hf_chunks(obj, prefix, split_column, size)), split_column


def _split_names(obj: Any, split_column: str | None) -> list[str]:
    """The split names of a multi-split ``DatasetDict``, checked.

    Raises:
        ValueError: a split is not train/validation/test (or an alias) and no split column is set.
    """
    names = list(obj.keys())
    unknown = [n for n in names if n.lower() not in _SPLIT_ALIASES]
    if unknown and split_column is None:
        raise DataError(
            f"the dataset has splits {names}, and {unknown} are not train/validation/test; "
            "choose one with data.hf_split=<name>"
        )
    return names


def _hf_source(
    source: str, *, hf_name: str | None, hf_config: str | None, hf_split: str | None, streaming: bool = False
) -> tuple[Any, str]:
    """The ``datasets`` object of a saved folder, local data files or a hub name, and the prefix of
    its rows' source ids (see :func:`load_records`); with ``streaming``, the ``IterableDataset`` (or
    dict) of local data files or a hub name, read as it is iterated."""
    import datasets

    local_name = os.path.basename(os.path.normpath(source))
    stream = {"streaming": True} if streaming else {}  # load_dataset's own default otherwise
    if hf_name is None and not streaming and _is_saved_dataset(source):
        obj = datasets.load_from_disk(source)
        if hf_split is not None and isinstance(obj, datasets.DatasetDict):
            if hf_split not in obj:
                raise DataError(f"data.hf_split={hf_split!r} is not in the saved dataset; it has {list(obj)}")
            obj = obj[hf_split]
            local_name = f"{local_name}:{hf_split}"
        return obj, local_name
    if hf_name is None and (os.path.exists(source) or glob.has_magic(source)):
        files = _expand_files(source)
        formats = {_file_format(f) for f in files}
        if len(formats) != 1 or None in formats:
            raise DataError(
                f"data.source={source!r} mixes file formats {sorted(map(str, formats))}; "
                "datasets.load_dataset needs files of one format"
            )
        builder = _HF_BUILDERS[str(formats.pop())]
        obj = datasets.load_dataset(builder, data_files=files, split=hf_split or "train", **stream)
        return obj, f"{local_name}:{hf_split or 'train'}"
    name = hf_name or source
    what = "streaming" if streaming else "loading"
    log.info("%s Hugging Face dataset %r (config=%r, split=%r)", what, name, hf_config, hf_split)
    obj = datasets.load_dataset(name, hf_config, split=hf_split, **stream)
    return obj, name + (f"/{hf_config}" if hf_config else "") + (f":{hf_split}" if hf_split else "")


def _row_chunks(
    source: str,
    *,
    format: str | None,
    hf_name: str | None,
    hf_config: str | None,
    hf_split: str | None,
    split_column: str | None,
    size: int,
) -> tuple[Any, str | None]:
    """A function returning a fresh iterator over chunks of ``(rows, source ids)`` of ``source``, and
    the split column (``"__split__"`` for a multi-split ``DatasetDict`` without one).

    Raises:
        ValueError: an unknown format, or a source that cannot be read.
    """
    if format is not None and format not in _FORMATS:
        raise DataError(f"unknown data.format={format!r}; use one of {', '.join(_FORMATS)} (or null to infer)")
    if format == "hf" or hf_name is not None or (format is None and _is_saved_dataset(source)):
        obj, prefix = _hf_source(source, hf_name=hf_name, hf_config=hf_config, hf_split=hf_split)
        return hf_chunks(obj, prefix, split_column, size)
    files, base = _expand_files(source), _label_base(source)
    return (lambda: _local_chunks(files, format, base, size)), split_column


def iter_records(
    source: str,
    *,
    format: str | None = None,
    domain_column: str | None = "domain",
    text_column: str = "text",
    prompt_column: str | None = None,
    response_column: str | None = None,
    messages_column: str | None = None,
    answer_column: str | None = None,
    split_column: str | None = None,
    hf_name: str | None = None,
    hf_config: str | None = None,
    hf_split: str | None = None,
    with_sources: bool = False,
    chunk_size: int = _CHUNK_ROWS,
) -> Iterator[list[dict[str, Any]]]:
    """The normalised records of :func:`load_records`, in chunks of at most ``chunk_size``, without
    holding the whole source in memory.

    The source is read twice: once for its columns (a file may mix schemas, so every row counts),
    once for the records. The checks of :func:`normalize_records` that need every row (rows with an
    empty domain, a domain left empty by dropped rows) raise after the last chunk; the warning about
    dropped rows is given there too.

    Args:
        source, format, domain_column, text_column, prompt_column, response_column, messages_column,
            answer_column, split_column, hf_name, hf_config, hf_split, with_sources: as for
            :func:`load_records`.
        chunk_size: records per chunk (the last may be shorter; a chunk may be shorter when rows are dropped).

    Raises:
        ValueError: with the problem and the fix, for unreadable sources and bad column mappings.
    """
    chunks, split_column = _row_chunks(
        source,
        format=format,
        hf_name=hf_name,
        hf_config=hf_config,
        hf_split=hf_split,
        split_column=split_column,
        size=chunk_size,
    )
    seen: dict[str, None] = {}
    total = 0
    for rows, _ids in chunks():  # every row: a file may mix schemas (plain text rows, then instruction rows)
        total += len(rows)
        seen.update(dict.fromkeys(_columns(rows)))
    if not total:
        raise DataError("the data source holds no rows; check data.source (and data.hf_split)")
    cols = _resolve_columns(
        list(seen),
        domain_column=domain_column,
        text_column=text_column,
        prompt_column=prompt_column,
        response_column=response_column,
        messages_column=messages_column,
        answer_column=answer_column,
        split_column=split_column,
    )
    empty_domain, offset = 0, 0
    dropped: Counter[str] = Counter()
    found: Counter[str] = Counter()
    for rows, ids in chunks():
        records, empty, lost = _normalize_rows(rows, cols, "default", ids if with_sources else None, offset)
        offset += len(rows)
        empty_domain += empty
        dropped.update(lost)
        found.update(r["domain"] for r in records)
        if records:
            yield records
    _check_domain_values(empty_domain, total, domain_column)
    if dropped:
        _warn_dropped(dropped, cols, text_column)
        _check_no_empty_domain(found, dropped)


# --------------------------------------------------------------------------------------------------
# normalising
# --------------------------------------------------------------------------------------------------


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    return isinstance(value, float) and math.isnan(value)


def _is_empty(value: Any) -> bool:
    """Missing, null, NaN, a blank string or an empty list."""
    if _is_missing(value):
        return True
    if isinstance(value, str):
        return not value.strip()
    return isinstance(value, (list, tuple)) and not value


def _as_text(value: Any) -> str:
    return "" if _is_missing(value) else str(value)


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:  # every row: a file may mix schemas (plain text rows, then instruction rows)
        for key in row:
            seen.setdefault(key, None)
    return list(seen)


def _require(column: str, columns: Sequence[str], option: str, what: str) -> None:
    if column not in columns:
        raise DataError(
            f"the data has no {what} column {column!r} (columns found: {list(columns)}); "
            f"set {option}=<name> to the column that holds it"
        )


def _turns(value: Any, where: str) -> list[dict[str, str]]:
    """A list of chat turns ``{"role", "content"}`` (TRL's conversational format), checked."""
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(t, Mapping) and "role" in t and "content" in t for t in value
    ):
        raise DataError(
            f"{where} must be a list of {{'role': ..., 'content': ...}} turns (got {str(value)[:80]!r}); fix the "
            "data, or point data.messages_column / data.prompt_column at another column"
        )
    return [{"role": str(t["role"]), "content": _as_text(t["content"])} for t in value]


def _conversation(value: Any, where: str) -> tuple[list[dict[str, str]], str] | None:
    """``(turns before the last assistant turn, its content)``; ``None`` without an assistant turn.

    Turns after the last assistant turn (say a trailing user turn) are left out.
    """
    turns = _turns(value, where)
    last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)
    if last is None:
        return None
    return turns[:last], turns[last]["content"]


def _instruction(
    row: dict[str, Any],
    row_no: int,
    prompt_column: str | None,
    response_columns: Sequence[str],
    messages_column: str | None,
) -> dict[str, Any] | None:
    """The instruction fields of one row (``prompt`` or ``messages``, and ``response``); None for other rows.

    A non-empty ``messages_column`` value is a conversation; otherwise ``prompt_column`` may hold a
    string or a list of turns (TRL's conversational prompt) and the first non-empty of
    ``response_columns`` a string or a one-turn list (TRL's conversational completion).
    """
    conversation = row.get(messages_column) if messages_column is not None else None
    if isinstance(conversation, (list, tuple)) and len(conversation):
        split = _conversation(conversation, f"row {row_no}, column {messages_column!r},")
        if split is None or not split[1].strip():
            return None
        return {"messages": split[0], "response": split[1]}
    response_column = next((c for c in response_columns if not _is_empty(row.get(c))), None)
    if response_column is None:
        return None
    response: Any = row.get(response_column)
    if isinstance(response, (list, tuple)):
        turns = _turns(response, f"row {row_no}, column {response_column!r},")
        if len(turns) != 1:
            raise DataError(
                f"row {row_no}: a conversational completion in column {response_column!r} must be one assistant "
                f"turn, got {len(turns)}; put earlier turns in the prompt"
            )
        response = turns[0]["content"]
    response = _as_text(response)
    if not response.strip():
        return None
    prompt = row.get(prompt_column)  # type: ignore[arg-type]
    if isinstance(prompt, (list, tuple)):
        return {"messages": _turns(prompt, f"row {row_no}, column {prompt_column!r},"), "response": response}
    return {"prompt": _as_text(prompt), "response": response}


def normalize_records(
    rows: Sequence[dict[str, Any]],
    *,
    domain_column: str | None = "domain",
    text_column: str = "text",
    prompt_column: str | None = None,
    response_column: str | None = None,
    messages_column: str | None = None,
    answer_column: str | None = None,
    split_column: str | None = None,
    default_domain: str = "default",
    sources: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Map raw rows (any column names) onto the normalised record schema of this module.

    Column rules:

    * ``domain_column`` must exist (``None`` puts every row in one domain named ``default_domain``);
      values are converted to ``str``; an empty or missing value is an error.
    * Instruction columns are ``prompt_column`` + ``response_column`` when given (both or neither),
      else a column literally named ``prompt`` with ``response`` and/or ``completion`` (TRL's
      prompt-completion convention; with both, a row's first non-empty one). A row whose response
      is non-empty becomes instruction data (``prompt`` + ``response``). A prompt holding a list of
      turns and a completion holding one assistant turn (TRL's conversational prompt-completion)
      are read too.
    * ``messages_column`` (or, when not given, a column literally named ``messages``) holds
      conversations, lists of ``{"role", "content"}`` turns (TRL's conversational format): a row
      with one becomes ``messages`` (the turns before the last assistant turn) + ``response`` (that
      turn's content); turns after it are left out, a conversation without one is dropped.
    * Any other row becomes plain text from ``text_column``. So one file may mix the kinds, as the
      embedded corpus does.
    * ``answer_column`` (or, when not given, a column literally named ``answer``) fills ``answer``.
    * ``split_column`` (or, when not given, a column literally named ``split``) fills ``split``;
      values may be train/validation/test or the aliases training/valid/val/dev/testing.
    * Rows without a non-empty text or response are dropped with a warning that counts them.
    * ``sources``, when given, holds one id per row (where the row came from, see
      :func:`load_records`); each record then carries its row's id as ``source``.

    Raises:
        ValueError: a named column is missing, only one of prompt/response columns is given, a
            conversation is not a list of turns, a domain value is empty, a split value is
            unknown, a domain is left with no rows, or ``sources`` and ``rows`` differ in length.
    """
    if not rows:
        raise DataError("the data source holds no rows; check data.source (and data.hf_split)")
    if sources is not None and len(sources) != len(rows):
        raise DataError(f"sources holds {len(sources)} ids for {len(rows)} rows; give one id per row")
    cols = _resolve_columns(
        _columns(rows),
        domain_column=domain_column,
        text_column=text_column,
        prompt_column=prompt_column,
        response_column=response_column,
        messages_column=messages_column,
        answer_column=answer_column,
        split_column=split_column,
    )
    out, empty_domain, dropped = _normalize_rows(rows, cols, default_domain, sources)
    _check_domain_values(empty_domain, len(rows), domain_column)
    if dropped:
        _warn_dropped(dropped, cols, text_column)
        _check_no_empty_domain(Counter(r["domain"] for r in out), dropped)
    return out


@dataclass(frozen=True)
class _ColumnMap:
    """The columns :func:`normalize_records` reads, resolved against the data's columns."""

    # the domain column (None: every row in the default domain)
    domain: str | None
    # the plain-text column, and whether the data has it
    text: str
    has_text: bool
    # the instruction prompt column, and the response columns in order of preference
    prompt: str | None
    responses: list[str]
    # the conversation, answer and split columns (None: not read)
    messages: str | None
    answer: str | None
    split: str | None


def _resolve_columns(
    columns: Sequence[str],
    *,
    domain_column: str | None,
    text_column: str,
    prompt_column: str | None,
    response_column: str | None,
    messages_column: str | None,
    answer_column: str | None,
    split_column: str | None,
) -> _ColumnMap:
    """Check the configured columns against the data's and fill in the conventional names.

    Args:
        columns: every column of the data.
        domain_column, text_column, prompt_column, response_column, messages_column, answer_column,
            split_column: the column mapping of :func:`normalize_records`.

    Returns:
        The columns to read.

    Raises:
        ValueError: a named column is missing, only one of prompt/response columns is given, or
            the data has no text, instruction or conversation column.
    """
    if domain_column is not None and domain_column not in columns:
        raise DataError(
            f"the data has no domain column {domain_column!r} (columns found: {columns}); "
            f"set data.domain_column=<name> to the column holding each example's domain"
        )
    if (prompt_column is None) != (response_column is None):
        raise DataError(
            f"instruction data needs both data.prompt_column and data.response_column (got prompt_column="
            f"{prompt_column!r}, response_column={response_column!r}); set both, or neither for plain text"
        )
    if prompt_column is not None:
        _require(prompt_column, columns, "data.prompt_column", "prompt")
        _require(response_column, columns, "data.response_column", "response")  # type: ignore[arg-type]
    response_columns = [response_column] if response_column is not None else []
    if prompt_column is None and "prompt" in columns:  # ours (response), TRL's (completion), or both
        response_columns = [c for c in ("response", "completion") if c in columns]
        prompt_column = "prompt" if response_columns else None
    if messages_column is not None:
        _require(messages_column, columns, "data.messages_column", "conversation")
    elif "messages" in columns:
        messages_column = "messages"
    has_text = text_column in columns
    if prompt_column is None and messages_column is None and not has_text:
        raise DataError(
            f"the data has no text column {text_column!r} (columns found: {columns}); set "
            "data.text_column=<name> for plain text, data.prompt_column=<name> and "
            "data.response_column=<name> for instruction data, or data.messages_column=<name> for conversations"
        )
    return _ColumnMap(
        domain=domain_column,
        text=text_column,
        has_text=has_text,
        prompt=prompt_column,
        responses=response_columns,
        messages=messages_column,
        answer=_optional_column(answer_column, "answer", columns, "data.answer_column"),
        split=_optional_column(split_column, "split", columns, "data.split_column"),
    )


def _optional_column(column: str | None, conventional: str, columns: Sequence[str], option: str) -> str | None:
    """A configured optional column (which must exist), else the column named ``conventional`` if any.

    Raises:
        ValueError: ``column`` is given but missing from ``columns``.
    """
    if column is not None:
        _require(column, columns, option, conventional)
        return column
    return conventional if conventional in columns else None


def _normalize_rows(
    rows: Sequence[dict[str, Any]],
    cols: _ColumnMap,
    default_domain: str,
    sources: Sequence[str] | None,
    offset: int = 0,
) -> tuple[list[dict[str, Any]], int, Counter[str]]:
    """The records of the rows, in order.

    Args:
        rows: the raw rows.
        cols: the columns to read.
        default_domain: the domain of every row when ``cols.domain`` is ``None``.
        sources: one source id per row, or ``None``.
        offset: the number of the first row (rows are named by number in errors).

    Returns:
        ``(records, rows with an empty domain, rows dropped per domain for an empty text/response)``.

    Raises:
        ValueError: a conversation is not a list of turns, or a split value is unknown.
    """
    out: list[dict[str, Any]] = []
    empty_domain = 0
    dropped: Counter[str] = Counter()
    for row_no, row in enumerate(rows):
        domain = default_domain if cols.domain is None else _as_text(row.get(cols.domain)).strip()
        if not domain:
            empty_domain += 1
            continue
        rec = _record(row, offset + row_no, cols, domain)
        if rec is None:
            dropped[domain] += 1
            continue
        if sources is not None:
            rec["source"] = sources[row_no]
        out.append(rec)
    return out, empty_domain, dropped


def _record(row: dict[str, Any], row_no: int, cols: _ColumnMap, domain: str) -> dict[str, Any] | None:
    """The record of one row of ``domain``; ``None`` when it has no non-empty text or response.

    Raises:
        ValueError: a conversation is not a list of turns, or the split value is unknown.
    """
    rec: dict[str, Any] = {"domain": domain}
    instruction = _instruction(row, row_no, cols.prompt, cols.responses, cols.messages)
    text = _as_text(row.get(cols.text)) if cols.has_text else ""
    if instruction is not None:
        rec.update(instruction)
    elif text.strip():
        rec["text"] = text
    else:
        return None
    answer = _as_text(row.get(cols.answer)).strip() if cols.answer is not None else ""
    if answer:  # missing, null and "" (an empty CSV cell) all mean "no answer"
        rec["answer"] = answer
    raw = _as_text(row.get(cols.split)).strip() if cols.split is not None else ""
    if raw:
        split = _SPLIT_ALIASES.get(raw.lower())
        if split is None:
            raise DataError(
                f"unknown split {raw!r} in split column {cols.split!r}; values must be one of "
                f"{sorted(_SPLIT_ALIASES)} (or unset data.split_column to split automatically)"
            )
        rec["split"] = split
    return rec


def _warn_dropped(dropped: Counter[str], cols: _ColumnMap, text_column: str) -> None:
    """Warn that rows without a text, response or assistant turn were dropped, per domain.

    Called by :func:`normalize_records` only: the warning is attributed to its caller.
    """
    what = " or ".join(
        f"{kind} ({col!r})"
        for kind, col in (
            ("text", text_column if cols.has_text else None),
            ("response", "/".join(cols.responses) or None),
            ("assistant turn", cols.messages),
        )
        if col
    )
    warnings.warn(
        f"dropped {sum(dropped.values())} rows with an empty {what} (per domain: {dict(sorted(dropped.items()))})",
        stacklevel=3,
    )


def _check_domain_values(empty_domain: int, total: int, domain_column: str | None) -> None:
    """Raise when ``empty_domain`` of the ``total`` rows have an empty domain value.

    Raises:
        ValueError: naming the count and the domain column.
    """
    if empty_domain:
        raise DataError(
            f"{empty_domain} of {total} rows have an empty value in the domain column {domain_column!r}; "
            "fill in their domain or remove those rows"
        )


def _check_no_empty_domain(found: Counter[str], dropped: Counter[str]) -> None:
    """Raise when a domain lost every row to :func:`_warn_dropped`'s drops (``found``: records kept per domain).

    Raises:
        ValueError: naming the first such domain.
    """
    for domain in dropped:
        if found[domain] == 0:
            raise DataError(
                f"domain {domain!r} is empty: all of its {dropped[domain]} rows have an empty text/response; "
                "fix the data or leave the domain out with data.domains=[...]"
            )


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------


def load_records(
    source: str,
    *,
    format: str | None = None,
    split: str | None = None,
    domain_column: str | None = "domain",
    text_column: str = "text",
    prompt_column: str | None = None,
    response_column: str | None = None,
    messages_column: str | None = None,
    answer_column: str | None = None,
    split_column: str | None = None,
    hf_name: str | None = None,
    hf_config: str | None = None,
    hf_split: str | None = None,
    with_sources: bool = False,
) -> list[dict[str, Any]]:
    """Read a multi-domain dataset and return normalised records (see the module docstring).

    Args:
        source: a file, a folder of data files, a glob, a ``save_to_disk`` folder, or (with
            ``format="hf"``) a Hugging Face hub dataset name.
        format: ``"jsonl"``, ``"json"``, ``"parquet"``, ``"csv"`` or ``"hf"``; ``None`` infers it from
            the file names (a ``save_to_disk`` folder is recognised as ``"hf"``). ``"hf"`` reads
            local files through ``datasets.load_dataset(<builder>, data_files=...)`` and anything
            that is not a local path through ``datasets.load_dataset(name, hf_config, split=...)``.
        split: keep only the records of this split (``train``/``validation``/``test``); needs split
            information (a split column, or a hub dataset with several splits).
        domain_column, text_column, prompt_column, response_column, messages_column, answer_column,
            split_column: column mapping, see :func:`normalize_records`.
        hf_name: a hub dataset name; when given, it is loaded instead of ``source``.
        hf_config: the hub dataset's configuration name.
        hf_split: the ``datasets`` split to load (``None`` loads all splits and keeps their names).
        with_sources: give each record a ``source``, the id of the row it was read from (below).

    Returns:
        The records, in file order (files in sorted path order).

    Source ids (``with_sources=True``) name a row so that a person can find and reload it. A file
    is named by its path relative to the source folder (for a glob: to its leading folders without
    wildcards), or by its name when the source is one file:

    * JSONL (and a ``.json`` file of lines): ``"<file>:<line>"``, the 1-based line number in the
      (decompressed) file;
    * Parquet, CSV (data rows, the header not counted) and a JSON array or object of columns:
      ``"<file>:<row>"``, the 0-based row index;
    * a ``save_to_disk`` folder: ``"<folder name>:<row>"``, and ``"<folder name>:<split>:<row>"``
      for a ``DatasetDict``;
    * ``format="hf"`` with local files: ``"<file, folder or glob name>:<split>:<row>"``, the row of
      ``datasets.load_dataset(<builder>, data_files=..., split=...)``;
    * a hub dataset: ``"<name>[/<config>]:<split>:<row>"`` (``<split>`` as given in ``hf_split``,
      slice included, or each split's name when all are loaded).

    Rows dropped (an empty text or response) leave the other rows' ids unchanged.

    Raises:
        ValueError: with the problem and the fix, for unreadable sources and bad column mappings.
    """
    records = [
        rec
        for chunk in iter_records(
            source,
            format=format,
            domain_column=domain_column,
            text_column=text_column,
            prompt_column=prompt_column,
            response_column=response_column,
            messages_column=messages_column,
            answer_column=answer_column,
            split_column=split_column,
            hf_name=hf_name,
            hf_config=hf_config,
            hf_split=hf_split,
            with_sources=with_sources,
        )
        for rec in chunk
    ]
    if split is not None:
        wanted = _SPLIT_ALIASES.get(split.lower())
        if wanted is None:
            raise DataError(f"unknown split={split!r}; use one of {list(SPLITS)}")
        if not any("split" in r for r in records):
            raise DataError(
                f"split={split!r} was asked for but the data carries no split information; set "
                "data.split_column=<name>, or load everything and use split_records"
            )
        records = [r for r in records if r.get("split") == wanted]
        if not records:
            raise DataError(f"the data has no records in split {wanted!r}")
    log.info("loaded %d records in %d domains from %s", len(records), len(domain_names(records)), hf_name or source)
    return records


def domain_names(records: Iterable[dict[str, Any]]) -> list[str]:
    """The sorted list of distinct domains in ``records`` (deterministic domain-id order)."""
    return sorted({r["domain"] for r in records})


def select_domains(records: Sequence[dict[str, Any]], domains: Sequence[str] | None) -> list[dict[str, Any]]:
    """Keep the records of ``domains`` (all when ``None``), in their original order.

    Raises:
        ValueError: ``domains`` is empty, repeats a name, or names a domain with no records (the
            message lists the domains that exist).
    """
    if domains is None:
        if not records:
            raise DataError("no records to select from; check data.source")
        return list(records)
    if isinstance(domains, str):
        raise DataError(f"data.domains must be a list of names, got the string {domains!r}; write [{domains!r}]")
    if len(domains) == 0:
        raise DataError("data.domains is an empty list; name at least one domain, or set it to null for all")
    repeated = sorted(d for d, c in Counter(domains).items() if c > 1)
    if repeated:
        raise DataError(f"data.domains names {repeated} more than once; list each domain once")
    available = domain_names(records)
    unknown = [d for d in domains if d not in set(available)]
    if unknown:
        raise DataError(
            f"unknown domain(s) {unknown} in data.domains; the data has domains {available} "
            "(check the spelling or data.domain_column)"
        )
    wanted = set(domains)
    return [r for r in records if r["domain"] in wanted]


def _domain_seed(seed: int, domain: str) -> int:
    """A 63-bit seed derived from ``(seed, domain)`` only, so domains split independently."""
    digest = hashlib.sha256(f"mixsel-split:{seed}:{domain}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def split_records(
    records: Sequence[dict[str, Any]],
    *,
    val_per_domain: int,
    test_per_domain: int,
    seed: int,
    split_column_present: bool | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Split records into train / validation / test.

    If the records carry ``split`` (``split_column_present=None`` detects this; ``True`` requires
    it; ``False`` ignores it), that assignment is kept; a split that is absent altogether (say a
    dataset with only train and test) is carved out of train per domain as below.

    Otherwise each domain is split on its own: its records are permuted by ``torch.randperm`` with a
    generator seeded from a hash of ``(seed, domain)``; the first ``test_per_domain`` go to test, the
    next ``val_per_domain`` to validation, the rest to train. The permutation depends only on the seed,
    the domain name and that domain's records, so adding or removing another domain leaves this domain's
    split unchanged. Within each split, records keep their original order, and each returned record is a
    shallow copy with ``split`` set.

    Raises:
        ValueError: negative sizes, records with and without ``split`` mixed, or a domain left
            without a train example.
    """
    import torch

    for name, value in (("val_per_domain", val_per_domain), ("test_per_domain", test_per_domain)):
        if int(value) != value or value < 0:
            raise DataError(f"data.{name} must be a non-negative integer, got {value!r}")
    tagged = sum("split" in r for r in records)
    if split_column_present is None:
        split_column_present = tagged > 0
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLITS}
    if split_column_present:
        if tagged != len(records):
            raise DataError(
                f"{len(records) - tagged} of {len(records)} records have no split while the others do; "
                "give every row a split value, or unset data.split_column to split automatically"
            )
        for rec in records:
            if rec["split"] not in out:
                raise DataError(f"unknown split {rec['split']!r}; use one of {list(SPLITS)}")
            out[rec["split"]].append(rec)
        missing = [name for name in ("validation", "test") if not out[name]]
        if missing and (val_per_domain if "validation" in missing else 0) + (
            test_per_domain if "test" in missing else 0
        ):
            # e.g. a hub dataset with only train/test: carve the absent split(s) out of train, per domain
            log.info("the data has no %s split; taking it from train per domain", " / ".join(missing))
            carved = split_records(
                out["train"],
                val_per_domain=val_per_domain if "validation" in missing else 0,
                test_per_domain=test_per_domain if "test" in missing else 0,
                seed=seed,
                split_column_present=False,
            )
            out["train"] = carved["train"]
            for name in missing:
                out[name] = carved[name]
        have_train = Counter(r["domain"] for r in out["train"])
        missing = [d for d in domain_names(records) if have_train[d] == 0]
        if missing:
            raise DataError(
                f"domain(s) {missing} have no train examples in the given split column; add train rows "
                "or leave them out with data.domains=[...]"
            )
        return out

    by_domain: dict[str, list[int]] = {}
    for i, rec in enumerate(records):
        by_domain.setdefault(rec["domain"], []).append(i)
    assignment = [""] * len(records)
    for domain in sorted(by_domain):
        members = by_domain[domain]
        n = len(members)
        if n - val_per_domain - test_per_domain < 1:
            raise DataError(
                f"domain {domain!r} has {n} examples: too few for test_per_domain={test_per_domain} + "
                f"val_per_domain={val_per_domain} and at least 1 train example; lower data.val_per_domain / "
                "data.test_per_domain or leave the domain out with data.domains=[...]"
            )
        gen = torch.Generator().manual_seed(_domain_seed(seed, domain))
        perm = torch.randperm(n, generator=gen).tolist()
        for rank, j in enumerate(perm):
            if rank < test_per_domain:
                assignment[members[j]] = "test"
            elif rank < test_per_domain + val_per_domain:
                assignment[members[j]] = "validation"
            else:
                assignment[members[j]] = "train"
    for rec, split in zip(records, assignment):
        out[split].append({**rec, "split": split})
    return out
