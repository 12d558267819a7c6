"""Vicuna v0 delta weights: ``target = base + delta``, and the inverse, streamed tensor by tensor.

Semantics are those of FastChat's v0 ``apply_delta`` that the original Video-LLaMA ships:

1. The base tokenizer gets a ``[PAD]`` token, so the base's ``model.embed_tokens.weight`` and
   ``lm_head.weight`` grow from 32000 to 32001 rows; the new rows are zero.
2. Every base tensor gets the delta tensor of the same name added.
3. The result is saved with the delta's tokenizer files and the delta's config.

The original only adds ``[PAD]`` to the base tokenizer to learn the new row count; here it is read
off the delta's embedding shape (the same 32001 for Vicuna v0; in general "the delta's vocab"), so
no tokenizer is loaded. :func:`make_delta` is the inverse: ``delta = target - base`` after the same
zero padding of the base.

Unlike the original (which holds base and delta as two full models, about 2 x 26 GB for 13B), the
work is streamed on state dicts: inputs are read in row chunks of about a million elements
through short-lived memory maps (per chunk for safetensors, per tensor for ``.bin`` shards), sums
are computed in fp32 (fp64 for fp64 inputs) and rounded once to the output dtype, and output
safetensors shards are written chunk by chunk, since every shape is known before the first byte is
written. Peak memory stays at tens of MB above the interpreter's, whatever the model size (see
``bench/apply_delta_memory.py``). Everything is checked before the output folder is created.

The output is written into a hidden sibling folder (``.NAME.PID.RANDOM.tmp``) that is renamed to
the output folder only when every file is complete: a full or read-only disk raises
:class:`~videollm.errors.StorageError` naming the folder and the cause and leaves no partial
output (so a retry is not refused as "not empty"); temporary folders of killed runs are removed
by the next one.

Rotary ``inv_freq`` buffers, which old LLaMA conversions stored, are skipped: current transformers
computes them and does not expect them in a checkpoint.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import logging
import math
import os
import re
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from videollm.checkpoint import _load_pickle, atomic_folder, iter_checkpoint_shards
from videollm.errors import CheckpointError, closest

logger = logging.getLogger(__name__)

# Tensors with one row per vocabulary entry: zero-padded at the end when the vocab grows.
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
SKIPPED = re.compile(r"rotary_emb\.inv_freq$")
# Non-weight files copied from the delta (apply) or the target (make-delta).
COPIED_FILES = ("config.json", "generation_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer*")
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # bytes, as transformers' "5GB"
CHUNK_ELEMENTS = 1 << 20  # rows are read and combined in chunks of about this many elements (4 MB in fp32)

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


@dataclass
class DeltaResult:
    """What :func:`apply_delta` / :func:`make_delta` wrote."""

    output: Path
    files: list[str]
    num_tensors: int
    vocab_size: int | None
    total_bytes: int
    inexact_elements: int = 0  # make_delta only: elements that will not round-trip exactly


# ----------------------------------------------------------------------------------------------
# Reading: lazy per-tensor access to a Hugging Face model folder
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype
    shard: Path


@dataclass
class ShardedReader:
    """Tensors of an HF model folder, read lazily, a slice of rows at a time.

    :meth:`get` returns something that reads rows when sliced (``src[a:b]``, or ``src[...]`` for
    a 0-dim tensor). Inputs are memory-mapped, and a mapping holds on to every page read through
    it until it is dropped, so mappings are kept short-lived: a safetensors file is mapped afresh
    for each slice (re-opening costs parsing a header of a few kB), a ``.bin`` shard for each
    tensor (re-opening costs unpickling its index of tensors). Legacy non-zip ``.bin`` files cannot
    be mapped: the last one read stays loaded whole.
    """

    folder: Path
    info: dict[str, TensorInfo] = field(default_factory=dict)
    _whole: tuple[Path, dict] | None = None

    @classmethod
    def open(cls, folder: str | os.PathLike) -> ShardedReader:
        reader = cls(Path(folder))
        for shard in iter_checkpoint_shards(reader.folder):
            for name, (shape, dtype) in _shard_specs(shard).items():
                if name in reader.info:
                    raise CheckpointError(f"{shard}: tensor {name} is also in {reader.info[name].shard.name}")
                reader.info[name] = TensorInfo(shape, dtype, shard)
        return reader

    def get(self, name: str):
        shard = self.info[name].shard
        if shard.suffix == ".safetensors":
            return _SafetensorsRows(shard, name)
        if self._whole is not None and self._whole[0] == shard:
            return self._whole[1][name]
        state = _load_bin(shard)
        if not zipfile.is_zipfile(shard):
            self._whole = (shard, state)
        return state[name]

    def config(self) -> dict | None:
        path = self.folder / "config.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError as e:
            raise CheckpointError(f"{path}: not valid json ({e})") from e


@dataclass(frozen=True)
class _SafetensorsRows:
    """Rows of one tensor of a safetensors file; each ``[index]`` reads through a fresh mapping,
    which lives as long as the tensor it returns."""

    shard: Path
    name: str

    def __getitem__(self, index) -> torch.Tensor:
        from safetensors import safe_open

        return safe_open(self.shard, "pt").get_slice(self.name)[index]


def _shard_specs(shard: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{name: (shape, dtype)}`` of one shard, reading no tensor data."""
    if shard.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(shard, "pt") as f:
                specs = {}
                for name in f.keys():
                    sl = f.get_slice(name)
                    if sl.get_dtype() not in _ST_DTYPES:
                        raise CheckpointError(f"{shard}: tensor {name} has unsupported dtype {sl.get_dtype()}")
                    specs[name] = (tuple(sl.get_shape()), _ST_DTYPES[sl.get_dtype()])
                return specs
        except SafetensorError as e:
            raise CheckpointError(f"{shard}: corrupt or truncated safetensors file ({e})") from e
    return {n: (tuple(t.shape), t.dtype) for n, t in _load_bin(shard).items()}


def _load_bin(shard: Path) -> dict[str, torch.Tensor]:
    # mmap needs torch's zip format; files in the legacy format are read whole.
    state = _load_pickle(shard, "cpu", mmap=zipfile.is_zipfile(shard))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{shard}: not a state dict of tensors")
    return state


# ----------------------------------------------------------------------------------------------
# Arithmetic
# ----------------------------------------------------------------------------------------------


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    dtype = functools.reduce(torch.promote_types, dtypes)
    return torch.float32 if dtype.is_floating_point and dtype.itemsize < 4 else dtype


def _add(base: torch.Tensor | None, delta: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``base`` zero-padded to ``delta``'s rows, plus ``delta``; rounded once to ``out_dtype``.

    Shapes: base ``(b_rows, *rest)`` (or None: all padding), delta ``(rows, *rest)``, ``b_rows <= rows``.
    """
    c = _compute_dtype(delta.dtype, out_dtype, *([base.dtype] if base is not None else []))
    out = delta.to(c, copy=True)
    if base is not None:
        out[: base.shape[0]].add_(base)  # upcast on the fly, no temporary copy of base
    return out.to(out_dtype)


def _subtract(target: torch.Tensor, base: torch.Tensor | None, out_dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """``target - base`` (base zero-padded to ``target``'s rows), rounded once to ``out_dtype``.

    Returns the delta and the number of elements where ``_add(base, delta)`` does not give back
    ``target`` exactly. In fp32 we have not seen it happen for a target made by adding something
    to the base in fp32 (a fine-tune, or :func:`apply_delta`'s output); in fp16 it happens where
    ``target - base`` is not representable in fp16 (e.g. tiny differences in the subnormal range),
    for a fraction of a percent of the elements of a fine-tune: an fp32 delta is exact there.
    """
    c = _compute_dtype(target.dtype, out_dtype, *([base.dtype] if base is not None else []))
    delta = target.to(c, copy=True)
    if base is not None:
        delta[: base.shape[0]].sub_(base)
    delta = delta.to(out_dtype)
    want = target.to(out_dtype)
    missed = _add(base, delta, out_dtype) != want
    if out_dtype.is_floating_point:
        missed &= ~torch.isnan(want)
    return delta, int(missed.sum())


def _chunks(base, base_rows: int, other, shape: tuple[int, ...]) -> Iterator[tuple[torch.Tensor | None, torch.Tensor]]:
    """Read ``(base[a:b], other[a:b])`` row chunks of about CHUNK_ELEMENTS elements.

    ``base`` has ``base_rows <= shape[0]`` rows; past them its chunk is shorter, or None.
    ``base`` / ``other`` are :meth:`ShardedReader.get` results; ``shape`` is other's shape.
    """
    if not shape:  # 0-dim
        yield base[...].reshape(1), other[...].reshape(1)
        return
    step = max(1, CHUNK_ELEMENTS // max(1, math.prod(shape[1:])))
    for start in range(0, shape[0], step):
        stop = min(start + step, shape[0])
        yield (base[start : min(stop, base_rows)] if start < base_rows else None), other[start:stop]


# ----------------------------------------------------------------------------------------------
# Writing: safetensors shards streamed chunk by chunk
# ----------------------------------------------------------------------------------------------


def _safetensors_header(entries: list[tuple[str, tuple[int, ...], torch.dtype]]) -> bytes:
    """Header of a safetensors file holding ``entries`` back to back, in order.

    Format: 8-byte little-endian header length, then a JSON object mapping each name to its dtype,
    shape and ``[begin, end)`` byte offsets into the data that follows, padded to 8 bytes.
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return len(blob).to_bytes(8, "little") + blob


def _plan_shards(entries: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_size: int):
    """Split entries (in order) into shards of at most ``max_shard_size`` bytes (a bigger tensor gets
    its own shard). Returns ``[(file_name, entries)]`` named as transformers names them."""
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = math.prod(entry[1]) * entry[2].itemsize
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    if len(shards) == 1:
        return [("model.safetensors", shards[0])]
    n = len(shards)
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", s) for i, s in enumerate(shards)]


# ----------------------------------------------------------------------------------------------
# The streamed operation shared by both directions
# ----------------------------------------------------------------------------------------------


def apply_delta(
    base_path: str | os.PathLike,
    target_path: str | os.PathLike,
    delta_path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
) -> DeltaResult:
    """Write ``base + delta`` (base zero-padded to the delta's vocab) to the folder ``target_path``.

    Output tensors take the delta's dtype unless ``dtype`` is given; the delta's config and
    tokenizer files are copied. Raises :class:`CheckpointError` before writing anything if a base
    tensor is absent from the delta, a shape does not match, or ``target_path`` is not empty.
    """
    return _stream(
        Path(base_path), Path(delta_path), Path(target_path),
        other_role="delta", out_role="target", subtract=False, dtype=dtype, max_shard_size=max_shard_size,
    )


def make_delta(
    base_path: str | os.PathLike,
    target_path: str | os.PathLike,
    delta_path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
) -> DeltaResult:
    """Write ``target - base`` (base zero-padded to the target's vocab) to the folder ``delta_path``.

    The inverse of :func:`apply_delta`: applying the result to the same base gives back the target.
    Every element is checked; those where floating point makes the round trip inexact are counted
    in ``inexact_elements`` and logged (in fp32, none seen for a target made by adding to the base;
    a fraction of a percent for fp16 fine-tunes, where ``dtype=torch.float32`` makes it exact).
    Output tensors take the target's dtype unless ``dtype`` is given (FastChat's deltas are fp16);
    the target's config and tokenizer files are copied.
    """
    return _stream(
        Path(base_path), Path(target_path), Path(delta_path),
        other_role="target", out_role="delta", subtract=True, dtype=dtype, max_shard_size=max_shard_size,
    )


def _stream(
    base_dir: Path, other_dir: Path, out_dir: Path, *, other_role: str, out_role: str,
    subtract: bool, dtype: torch.dtype | None, max_shard_size: int,
) -> DeltaResult:
    """``out = other - padded(base)`` if ``subtract`` else ``padded(base) + other``, streamed."""
    for role, path in (("base", base_dir), (other_role, other_dir)):
        if out_dir.resolve() == path.resolve():
            raise CheckpointError(f"{out_dir}: the {out_role} folder must differ from the {role} folder")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CheckpointError(f"{out_dir}: {out_role} folder exists and is not empty; remove it or choose another")

    base, other = ShardedReader.open(base_dir), ShardedReader.open(other_dir)
    entries = _check_compatible(base, other, other_role, dtype)
    vocab = next((other.info[n].shape[0] for n in VOCAB_TENSORS if n in other.info), None)
    config = _output_config(base, other, other_role, vocab)
    plan = _plan_shards(entries, max_shard_size)

    # Everything is checked: from here on, write, into a hidden sibling folder that becomes
    # out_dir only when complete (a full disk or a kill leaves no partial out_dir behind).
    inexact = 0
    total = sum(math.prod(s) * d.itemsize for _, s, d in entries)
    from tqdm import tqdm

    with atomic_folder(out_dir) as work:
        _copy_side_files(other_dir, work)
        if not (work / "config.json").exists() and config is not None:
            (work / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"Writing {out_role}", disable=None) as bar:
            for file_name, shard_entries in plan:
                header = _safetensors_header(shard_entries)
                with _open_output(work / file_name) as f:
                    f.write(header)
                    for name, shape, out_dtype in shard_entries:
                        b_rows = base.info[name].shape[0] if shape else 1
                        for b_chunk, o_chunk in _chunks(base.get(name), b_rows, other.get(name), shape):
                            if subtract:
                                chunk, n_bad = _subtract(o_chunk, b_chunk, out_dtype)
                                inexact += n_bad
                            else:
                                chunk = _add(b_chunk, o_chunk, out_dtype)
                            f.write(chunk.contiguous().reshape(-1).view(torch.uint8).numpy())
                        bar.update(math.prod(shape) * out_dtype.itemsize)
                    if f.tell() != len(header) + sum(math.prod(s) * d.itemsize for _, s, d in shard_entries):
                        raise CheckpointError(f"{out_dir / file_name}: internal error: wrote {f.tell()} bytes, header says otherwise")
                    f.flush()
                    os.fsync(f.fileno())  # a full disk may only show here
        if len(plan) > 1:
            index = {
                "metadata": {"total_size": total},
                "weight_map": {name: file_name for file_name, es in plan for name, _, _ in es},
            }
            (work / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if inexact:
        logger.warning(
            "%s: %d of %d elements will not give back the target exactly when applied (off by about "
            "an ulp: target - base is not representable in the delta's dtype there); a float32 "
            "delta avoids this", out_dir, inexact, sum(math.prod(s) for _, s, _ in entries))
    logger.info("Wrote %s: %d tensors in %d shard(s), %.2f GB", out_dir, len(entries), len(plan), total / 1e9)
    return DeltaResult(out_dir, sorted(p.name for p in out_dir.iterdir()), len(entries), vocab, total, inexact)


def _check_compatible(
    base: ShardedReader, other: ShardedReader, other_role: str, dtype: torch.dtype | None
) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Check names and shapes; return the output entries ``(name, shape, dtype)`` in base order."""
    skipped = [n for n in list(base.info) + list(other.info) if SKIPPED.search(n)]
    if skipped:
        logger.info("Skipping %d rotary inv_freq buffers (recomputed by transformers)", len(skipped))
    base_names = [n for n in base.info if not SKIPPED.search(n)]
    other_names = {n for n in other.info if not SKIPPED.search(n)}
    entries = []
    for name in base_names:
        if name not in other_names:
            raise CheckpointError(
                f"{base.folder}: base tensor {name} is missing from the {other_role} {other.folder}"
                f"{closest(name, other_names)}: are these the right base and {other_role}?"
            )
        b_shape, o_info = base.info[name].shape, other.info[name]
        o_shape = o_info.shape
        grows = name in VOCAB_TENSORS and len(b_shape) == len(o_shape) and b_shape[1:] == o_shape[1:] and b_shape[0] <= o_shape[0]
        if b_shape != o_shape and not grows:
            why = " (its vocab must be at least the base's)" if name in VOCAB_TENSORS else ""
            raise CheckpointError(
                f"{other.folder}: {other_role} tensor {name} has shape {tuple(o_shape)} but the base "
                f"{base.folder} has {tuple(b_shape)}{why}: are these the right base and {other_role}?"
            )
        out_dtype = dtype or o_info.dtype
        if out_dtype not in _ST_NAMES:
            raise CheckpointError(f"{name}: cannot write dtype {out_dtype} to safetensors")
        entries.append((name, o_shape, out_dtype))
    extra = sorted(other_names - set(base_names))
    if extra:
        raise CheckpointError(
            f"{other.folder}: {other_role} has {len(extra)} tensors the base {base.folder} lacks "
            f"(first: {extra[0]}): are these the right base and {other_role}?"
        )
    return entries


def _output_config(base: ShardedReader, other: ShardedReader, other_role: str, vocab: int | None) -> dict | None:
    """The config to write if ``other`` has none: the base's with the new vocab size. Also checks
    that ``other``'s config agrees with its own embedding rows."""
    config = other.config()
    if config is not None:
        if vocab is not None and config.get("vocab_size", vocab) != vocab:
            raise CheckpointError(
                f"{other.folder / 'config.json'}: vocab_size {config['vocab_size']} disagrees with the "
                f"{other_role}'s embedding rows ({vocab})"
            )
        return None
    config = base.config()
    if config is None:
        logger.warning("Neither %s nor %s has a config.json; the output will need one", other.folder, base.folder)
        return None
    logger.info("%s has no config.json: using the base's with vocab_size=%s", other.folder, vocab)
    if vocab is not None:
        config["vocab_size"] = vocab
    return config


def _open_output(path: Path):
    """The file an output shard is streamed into (one place, so tests can make it fail)."""
    return open(path, "wb")


def _copy_side_files(src: Path, dst: Path) -> None:
    for path in sorted(src.iterdir()):
        if path.is_file() and any(fnmatch.fnmatch(path.name, p) for p in COPIED_FILES):
            shutil.copyfile(path, dst / path.name)


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"512MiB"`` -> 536_870_912, ``"1000"`` -> 1000."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    found = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", str(text))
    if not found or found.group(2).upper() not in units:
        raise ValueError(f"{text!r}: not a size (use e.g. 5GB, 500MB, 2GiB)")
    return int(float(found.group(1)) * units[found.group(2).upper()])
