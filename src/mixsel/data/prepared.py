"""The prepared corpus: a data source tokenised once into memory-mapped Arrow files, shared by every run.

``mixsel train``, ``mixsel compare``, every seed and method, every torchrun rank and the Hugging Face
route read the same prepared store, so a corpus is tokenised once per tokenisation, not once per run:

1. the source is read in chunks and normalised (:func:`mixsel.data.loading.iter_records`) into an
   Arrow dataset (``datasets.Dataset.from_generator``), never held whole in Python objects;
2. ``Dataset.map(batched=True, num_proc=<cores>)`` tokenises it with the one tokenisation of mixsel
   (:mod:`mixsel.data.tokenize`: prompt masking, chat template, truncation) into Arrow files holding
   ``input_ids``, ``labels``, the prompt and reference answer, the row's domain, split and source id,
   and what truncation did;
3. the small per-row arrays that splitting and sampling need (domain, split, kept, counts) are written
   to ``index.npz`` and a ``manifest.json`` (the key's inputs, each file's size and the SHA-256 of its
   first and last MiB, row counts, the warnings given while preparing) is written last; the folder is
   renamed into place in one step.

A run then splits, filters domains and caps train rows by index arithmetic on those arrays
(:meth:`PreparedCorpus.mixture`): the splits are exactly those of
:func:`mixsel.data.loading.split_records` on the same records, and the tokens are read from the
memory-mapped files only for the rows a step draws.

The store's key is a hash of the source's content (per file: path, size, modification time and the
SHA-256 of its first and last MiB; a ``datasets`` object's fingerprint), the tokenizer (vocabulary,
special tokens, chat template) and every option that changes the tokens or the rows (column mapping,
``max_length``, ``truncation``, ``separator``, ``chat_template``); not the seed, the split sizes, the
domains kept or the train cap, which are applied at load time. It lives in ``data.cache_dir``, else
``$MIXSEL_CACHE``, else ``<datasets cache>/mixsel`` (``$HF_DATASETS_CACHE``, or under ``$HF_HOME`` /
``$XDG_CACHE_HOME``); ``data.cache=false`` prepares into a temporary folder removed at exit.

Faults: a folder without a valid manifest, or whose files differ from it (size, head or tail hash,
rows), is prepared again with one warning; processes preparing the same key take a file lock, so one
prepares and the others wait and map its files; a full disk stops with one line and removes the half
written folder.
"""

from __future__ import annotations

import atexit
import errno
import gc
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mixsel.config import DataConfig
from mixsel.errors import DataError

__all__ = ["PreparedCorpus", "cache_root", "prepare_corpus"]

log = logging.getLogger(__name__)

#: Bumped whenever the layout or the tokenisation of a prepared store changes (older stores are not read).
STORE_VERSION = 1
_SPLIT_CODE = {"train": 0, "validation": 1, "test": 2}
_HEAD_TAIL = 1 << 20
_PARALLEL_MIN_ROWS = 50_000  # below this, worker processes cost more than they save
_PROGRESS_MIN_ROWS = 20_000
# rows per map batch, and so per Arrow record batch: opening a store touches each batch's header page
# (and the kernel maps its neighbours), so fewer, larger batches keep a large store's resident pages few
_MAP_BATCH = 4096


# --------------------------------------------------------------------------------------------------
# where and under which key
# --------------------------------------------------------------------------------------------------


def cache_root(cfg: DataConfig, cache_dir: str | None = None) -> Path:
    """The folder holding prepared corpora: ``cache_dir``, ``cfg.cache_dir``, ``$MIXSEL_CACHE``, else
    ``<datasets cache>/mixsel`` (``$HF_DATASETS_CACHE``, or under ``$HF_HOME`` / ``$XDG_CACHE_HOME``)."""
    chosen = cache_dir or cfg.cache_dir or os.environ.get("MIXSEL_CACHE")
    if chosen:
        return Path(chosen).expanduser()
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "mixsel"


def _file_fingerprint(path: str) -> dict[str, Any]:
    """Path, size, modification time and the SHA-256 of the first and last MiB of a file."""
    st = os.stat(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(_HEAD_TAIL))
        if st.st_size > 2 * _HEAD_TAIL:
            f.seek(-_HEAD_TAIL, os.SEEK_END)
        digest.update(f.read(_HEAD_TAIL))
    return {
        "path": os.path.abspath(path),
        "bytes": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "sha256": digest.hexdigest(),
    }


def _source_fingerprint(cfg: DataConfig) -> dict[str, Any]:
    """What identifies the content of ``cfg.source`` (see the module docstring)."""
    from mixsel.data.loading import _expand_files, _hf_source, _is_saved_dataset

    if cfg.source == "embedded":
        from mixsel.data.embedded import EMBEDDED_DIR

        return {"embedded": _file_fingerprint(str(Path(EMBEDDED_DIR) / "corpus.jsonl.gz"))}
    if cfg.format != "hf" and not (cfg.format is None and _is_saved_dataset(cfg.source)):
        return {"files": [_file_fingerprint(f) for f in _expand_files(cfg.source)]}
    obj, prefix = _hf_source(cfg.source, hf_name=None, hf_config=cfg.hf_config, hf_split=cfg.hf_split)
    parts = obj.values() if hasattr(obj, "values") else [obj]
    return {"datasets": prefix, "fingerprints": [getattr(d, "_fingerprint", None) for d in parts]}


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the tokenizer's vocabulary, special tokens and chat template."""
    blob = json.dumps(
        [
            type(tokenizer).__name__,
            sorted(tokenizer.get_vocab().items()),
            str(tokenizer.all_special_tokens),
            str(getattr(tokenizer, "chat_template", None)),
        ]
    )
    return hashlib.sha256(blob.encode()).hexdigest()


#: The DataConfig fields that change the prepared rows or tokens (the others act at load time).
_KEY_FIELDS = (
    "source",
    "format",
    "domain_column",
    "text_column",
    "prompt_column",
    "response_column",
    "messages_column",
    "answer_column",
    "split_column",
    "hf_config",
    "hf_split",
    "max_length",
    "truncation",
    "separator",
    "chat_template",
)


def _key_inputs(cfg: DataConfig, tokenizer: Any) -> dict[str, Any]:
    from mixsel.data.tokenize import uses_chat_template

    settings = {name: getattr(cfg, name) for name in _KEY_FIELDS}
    settings["chat_template"] = uses_chat_template(tokenizer, cfg.chat_template)
    return {
        "version": STORE_VERSION,
        "source": _source_fingerprint(cfg),
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "settings": settings,
    }


def _key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]


# --------------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------------


def _raw_features() -> Any:
    import datasets

    text = datasets.Value("string")
    return datasets.Features(
        {
            "domain": text,
            "text": text,
            "prompt": text,
            "messages": text,  # the turns before the response, as JSON
            "response": text,
            "answer": text,
            "split": text,
            "source": text,
        }
    )


def _token_features() -> Any:
    import datasets

    return datasets.Features(
        {
            "domain": datasets.Value("string"),
            "split": datasets.Value("string"),
            "source": datasets.Value("string"),
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "labels": datasets.Sequence(datasets.Value("int32")),
            "prompt_text": datasets.Value("string"),
            "reference": datasets.Value("string"),
            "status": datasets.Value("int8"),
            "truncated": datasets.Value("bool"),
            "response_cut": datasets.Value("bool"),
            "instruction": datasets.Value("bool"),
            "scored": datasets.Value("bool"),
            "response_tokens": datasets.Value("int32"),
            "num_targets": datasets.Value("int32"),
        }
    )


def _write_raw(path: Path, cfg: DataConfig, progress: bool) -> int:
    """Write the normalised records of ``cfg.source`` to an Arrow stream file, a chunk at a time.

    Returns:
        The number of rows written.
    """
    import pyarrow as pa
    from tqdm.auto import tqdm

    from mixsel.data.build import record_chunks

    schema = _raw_features().arrow_schema
    rows = 0
    with (
        pa.OSFile(str(path), "wb") as sink,
        pa.ipc.new_stream(sink, schema) as writer,
        tqdm(desc="mixsel: reading rows", unit=" rows", disable=not progress) as bar,
    ):
        for chunk in record_chunks(cfg):
            columns: dict[str, list[Any]] = {name: [] for name in schema.names}
            for rec in chunk:
                messages = rec.get("messages")
                columns["messages"].append(None if messages is None else json.dumps(messages))
                for name in ("domain", "text", "prompt", "response", "answer", "split", "source"):
                    columns[name].append(rec.get(name))
            writer.write_table(pa.Table.from_pydict(columns, schema=schema))
            rows += len(chunk)
            bar.update(len(chunk))
    return rows


def _tokenize_batch(batch: dict[str, list[Any]], tokenizer: Any, settings: dict[str, Any]) -> dict[str, list[Any]]:
    """``Dataset.map``'s function: a batch of raw rows tokenised by :mod:`mixsel.data.tokenize`'s rules."""
    gc_was_on = gc.isenabled()
    gc.disable()  # a batch allocates ~10^5 small lists: cyclic collections would only rescan them
    try:
        return _tokenize_records(batch, tokenizer, settings)
    finally:
        if gc_was_on:
            gc.enable()


def _tokenize_records(batch: dict[str, list[Any]], tokenizer: Any, settings: dict[str, Any]) -> dict[str, list[Any]]:
    from mixsel.data.tokenize import KEPT, encode_rows, row_outcome

    records = []
    for i, domain in enumerate(batch["domain"]):
        rec: dict[str, Any] = {"domain": domain}
        if batch["response"][i] is not None:
            if batch["messages"][i] is not None:
                rec["messages"] = json.loads(batch["messages"][i])
            else:
                rec["prompt"] = batch["prompt"][i]
            rec["response"] = batch["response"][i]
        else:
            rec["text"] = batch["text"][i]
        if batch["answer"][i] is not None:
            rec["answer"] = batch["answer"][i]
        records.append(rec)
    encoded = encode_rows(records, tokenizer, **settings)
    out: dict[str, list[Any]] = {name: [] for name in _token_features() if name not in ("domain", "split", "source")}
    for rec, enc in zip(records, encoded):
        status, answer = row_outcome(rec, enc)
        ids = enc.ids if status == KEPT else []
        out["input_ids"].append(ids)
        out["labels"].append([-100] * enc.prompt_len + ids[enc.prompt_len :] if ids else [])
        out["prompt_text"].append(enc.prompt)
        out["reference"].append(answer)
        out["status"].append(status)
        out["truncated"].append(bool(enc.truncated))
        out["response_cut"].append(bool(enc.response_cut))
        out["instruction"].append(enc.prompt is not None)
        out["scored"].append(status == KEPT and enc.prompt is not None and answer is not None)
        out["response_tokens"].append(int(enc.response_tokens))
        out["num_targets"].append(len(ids) - max(enc.prompt_len, 1) if ids else 0)
    return out


def _workers(cfg: DataConfig, rows: int) -> int | None:
    if rows < _PARALLEL_MIN_ROWS and cfg.prepare_workers is None:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n = cfg.prepare_workers or cores
    return n if n > 1 else None


def _index_arrays(dataset: Any, domains: list[str]) -> dict[str, np.ndarray]:
    """The small per-row arrays of ``index.npz``, read column by column from the Arrow files."""
    import pyarrow.compute as pc

    table = dataset.data.table
    lookup = {d: i for i, d in enumerate(domains)}
    dom = pc.dictionary_encode(table.column("domain")).combine_chunks()
    dom_map = np.array([lookup[str(d)] for d in dom.dictionary.to_pylist()], dtype=np.int32)
    split = pc.dictionary_encode(table.column("split").fill_null("")).combine_chunks()
    split_map = np.array([_SPLIT_CODE.get(str(s), -1) for s in split.dictionary.to_pylist()], dtype=np.int8)
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False).astype(np.int32)
    return {
        "domain": dom_map[dom.indices.to_numpy(zero_copy_only=False)],
        "split": split_map[split.indices.to_numpy(zero_copy_only=False)],
        "status": _np(table, "status", np.int8),
        "truncated": _np(table, "truncated", np.int8),
        "response_cut": _np(table, "response_cut", np.int8),
        "instruction": _np(table, "instruction", np.int8),
        "scored": _np(table, "scored", np.int8),
        "response_tokens": _np(table, "response_tokens", np.int32),
        "num_targets": _np(table, "num_targets", np.int32),
        "length": lengths,
    }


def _np(table: Any, column: str, dtype: Any) -> np.ndarray:
    return table.column(column).to_numpy().astype(dtype)


def _hash_head_tail(path: Path) -> str:
    return _file_fingerprint(str(path))["sha256"]


def _no_space(err: OSError) -> bool:
    return err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


@dataclass
class _Progress:
    """Whether ``datasets`` shows its progress bars while preparing (rows/s and ETA)."""

    # show the bars
    show: bool

    def __enter__(self) -> None:
        from datasets import utils as hf_tqdm

        self._was = hf_tqdm.are_progress_bars_disabled()
        (hf_tqdm.enable_progress_bars if self.show else hf_tqdm.disable_progress_bars)()

    def __exit__(self, *exc: Any) -> None:
        from datasets import utils as hf_tqdm

        (hf_tqdm.disable_progress_bars if self._was else hf_tqdm.enable_progress_bars)()


def _build(folder: Path, cfg: DataConfig, tokenizer: Any, inputs: dict[str, Any], progress: bool | None) -> None:
    """Prepare ``cfg.source`` into ``folder`` (which must not exist): Arrow files, ``index.npz``, ``manifest.json``."""
    import datasets

    from mixsel.data.tokenize import _check_settings

    _check_settings(cfg.max_length, cfg.truncation, [])
    started = time.perf_counter()
    folder.mkdir(parents=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = _write_raw(folder / "raw.arrow", cfg, progress if progress is not None else sys.stderr.isatty())
        raw = datasets.Dataset.from_file(str(folder / "raw.arrow"))
        show = progress if progress is not None else rows >= _PROGRESS_MIN_ROWS
        workers = _workers(cfg, rows)
        settings = {
            "max_length": cfg.max_length,
            "truncation": cfg.truncation,
            "separator": cfg.separator,
            "chat_template": cfg.chat_template,
        }
        with _Progress(bool(show)):
            tokens = raw.map(
                _tokenize_batch,
                batched=True,
                batch_size=_MAP_BATCH,
                writer_batch_size=_MAP_BATCH,
                num_proc=workers,
                fn_kwargs={"tokenizer": tokenizer, "settings": settings},
                remove_columns=["text", "prompt", "messages", "response", "answer"],
                features=_token_features(),
                cache_file_name=str(folder / "tokens.arrow"),
                new_fingerprint=f"mixsel-tokens-{folder.name}",
                desc=f"mixsel: tokenising {rows} rows" + (f" ({workers} processes)" if workers else ""),
            )
    files = sorted({Path(f["filename"]).name for f in tokens.cache_files})
    domains = sorted(set(tokens.data.table.column("domain").unique().to_pylist()))
    np.savez(folder / "index.npz", **_index_arrays(tokens, domains))
    del tokens, raw
    (folder / "raw.arrow").unlink()
    notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    manifest = {
        "version": STORE_VERSION,
        "key": folder.name.split(".tmp")[0],
        "inputs": inputs,
        "rows": rows,
        "domains": domains,
        "files": [
            {"name": name, "bytes": (folder / name).stat().st_size, "sha256": _hash_head_tail(folder / name)}
            for name in [*files, "index.npz"]
        ],
        "notes": notes,
        "seconds": round(time.perf_counter() - started, 3),
        "workers": workers or 1,
    }
    tmp = folder / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / "manifest.json")


def _check(folder: Path) -> tuple[dict[str, Any] | None, str]:
    """The manifest of a complete, intact store in ``folder``; else ``(None, why)``."""
    path = folder / "manifest.json"
    if not path.exists():
        return None, "no manifest: an interrupted preparation"
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("version") != STORE_VERSION:
            return None, f"written by another store version ({manifest.get('version')})"
        for entry in manifest["files"]:
            file = folder / entry["name"]
            if not file.exists():
                return None, f"{entry['name']} is missing"
            if file.stat().st_size != entry["bytes"]:
                return None, f"{entry['name']} has {file.stat().st_size} bytes, the manifest says {entry['bytes']}"
            if _hash_head_tail(file) != entry["sha256"]:
                return None, f"{entry['name']} differs from its checksum"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, f"unreadable manifest ({err})"
    return manifest, ""


class PreparedCorpus:
    """A prepared store, memory-mapped: the tokenised rows of a whole source and their index arrays.

    Attributes:
        path: the store's folder.
        manifest: its ``manifest.json``.
        domains: the domain names of the whole source, sorted (``index["domain"]`` indexes them).
        index: per-row arrays (``domain``, ``split`` -1/0/1/2 for none/train/validation/test,
            ``status`` 0 kept / 1 dropped for length / 2 no target token, ``truncated``,
            ``response_cut``, ``instruction``, ``scored``, ``response_tokens``, ``num_targets``, ``length``).
        dataset: the rows as a memory-mapped ``datasets.Dataset``.
    """

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        import datasets

        self.path = path
        self.manifest = manifest
        self.domains: list[str] = list(manifest["domains"])
        with np.load(path / "index.npz") as npz:
            self.index = {name: npz[name] for name in npz.files}
        parts = [
            datasets.Dataset.from_file(str(path / f["name"])) for f in manifest["files"] if f["name"] != "index.npz"
        ]
        self.dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        if len(self.dataset) != manifest["rows"] or len(self.index["domain"]) != manifest["rows"]:
            raise DataError(
                f"the prepared data in {path} holds {len(self.dataset)} rows, its manifest {manifest['rows']}"
            )
        self.table = self.dataset.data.table

    def __len__(self) -> int:
        return int(self.manifest["rows"])

    def mixture(self, cfg: DataConfig, tokenizer: Any, seed: int = 0, *, source: str = "") -> Any:
        """The train / validation / test :class:`mixsel.data.Mixture` of ``cfg`` (:mod:`mixsel.data.split_index`)."""
        from mixsel.data.split_index import mixture_from_corpus

        return mixture_from_corpus(self, cfg, tokenizer, seed, source=source)


_TEMP_ROOTS: list[str] = []


def _temp_root() -> Path:
    if not _TEMP_ROOTS:
        root = tempfile.mkdtemp(prefix="mixsel-prepared-")
        _TEMP_ROOTS.append(root)
        atexit.register(shutil.rmtree, root, True)
    return Path(_TEMP_ROOTS[0])


def prepare_corpus(
    cfg: DataConfig, tokenizer: Any, *, cache_dir: str | None = None, progress: bool | None = None
) -> PreparedCorpus:
    """The prepared store of ``cfg``'s source and tokenisation: reused when one exists, else built.

    Args:
        cfg: the data settings (source, columns, tokenisation; ``cache``, ``cache_dir``, ``prepare_workers``).
        tokenizer: the model's tokenizer.
        cache_dir: overrides ``cfg.cache_dir``.
        progress: show ``datasets``' progress bars (default: for 20,000 rows or more).

    Returns:
        The memory-mapped :class:`PreparedCorpus`.

    Raises:
        DataError: the source cannot be read, or the disk filled up while preparing (nothing half written is left).
    """
    from filelock import FileLock

    inputs = _key_inputs(cfg, tokenizer)
    key = _key(inputs)
    root = cache_root(cfg, cache_dir) if cfg.cache else _temp_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / key
    with FileLock(str(root / f"{key}.lock")):
        if final.exists():
            manifest, why = _check(final)
            if manifest is not None:
                try:
                    return _open(final, manifest)
                except Exception as err:  # any unreadable store is prepared again, never trusted
                    why = f"unreadable: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
            warnings.warn(
                f"the prepared data in {final} is incomplete or damaged ({why}); preparing it again", stacklevel=2
            )
            shutil.rmtree(final, ignore_errors=True)
        for stale in root.glob(f"{key}.tmp*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed preparation (we hold the lock)
        building = root / f"{key}.tmp{os.getpid()}"
        log.info("preparing %s into %s", cfg.source, final)
        try:
            _build(building, cfg, tokenizer, inputs, progress)
            os.rename(building, final)
        except OSError as err:
            shutil.rmtree(building, ignore_errors=True)
            if _no_space(err):
                raise DataError(
                    f"no space left on the device while preparing the data in {root} ({err.strerror}); free space "
                    "there or point data.cache_dir at a larger disk"
                ) from None
            raise
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        manifest, why = _check(final)
        if manifest is None:
            raise DataError(f"the data just prepared in {final} does not verify ({why}); check the disk")
        log.info("prepared %d rows in %.1f s (%s)", manifest["rows"], manifest["seconds"], final)
        return _open(final, manifest)


def _open(folder: Path, manifest: dict[str, Any]) -> PreparedCorpus:
    corpus = PreparedCorpus(folder, manifest)
    for note in manifest.get("notes", []):
        warnings.warn(note, stacklevel=3)
    return corpus
