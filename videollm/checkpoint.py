"""Safe checkpoint I/O: load without running pickled code, save without ever leaving half a file.

Used by the models (loading the released branch checkpoints), the runner (saving and resuming) and
the conversion tools (``apply_delta.py``).

Formats:
- ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt``: ``torch.save`` pickles, always read with
  ``torch.load(weights_only=True)``. A file that needs arbitrary code to unpickle is refused.
  The original Video-LLaMA's runner checkpoints, ``{"model": state_dict, "optimizer": AdamW state,
  "config": plain dict, "scaler": dict or None, "epoch": int}``, load fine this way: their config
  was stored as a plain container, not an OmegaConf object. A file whose ``config`` is an OmegaConf
  ``DictConfig`` (or holds e.g. ``pathlib.Path``) is refused; :func:`load_file`'s error says how to
  convert it.
- ``.safetensors``: read with safetensors.
- Hugging Face model folders: :func:`iter_checkpoint_shards` lists their weight files.

Saving is all or nothing: :func:`atomic_path` (one file) and :func:`atomic_folder` (a folder of
files) write into a hidden sibling ``.NAME.PID.RANDOM.tmp`` and rename it into place when
complete, so a kill or a full disk never leaves a half-written file under a real name;
:func:`remove_stale_temporaries` clears what killed processes left. Storage failures (no space
left, read-only file system, quota, I/O errors: from the OS, from torch's zip writer, from
safetensors) raise :class:`~videollm.errors.StorageError` naming the path and the cause.
``torch.save`` is given a Python file object, so a full disk is reported with its errno rather
than as torch's bare ``unexpected pos``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import re
import shutil
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch

from videollm.errors import CheckpointError, StorageError

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"

# Hugging Face folder layouts, in order of preference: (index file, single file).
HF_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)

_CONVERT_HINT = (
    "If you trust this file, convert it once to a safe one, e.g. in Python: "
    "`obj = torch.load(path, weights_only=False)`, keep only tensors and plain "
    "dicts/lists/numbers/strings (e.g. `OmegaConf.to_container(obj['config'])`), then "
    "`videollm.checkpoint.save_atomic(obj, new_path)`; or allow the named class explicitly with "
    "`torch.serialization.add_safe_globals([...])` before loading."
)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load one checkpoint file into a dict, never executing code stored in it.

    Raises:
        CheckpointError: the file is missing, of an unknown type, corrupt, not a dict, or needs
            arbitrary code to unpickle (the message names the offending global).
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise CheckpointError(f"{path}: checkpoint {what}")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        obj = _load_safetensors(path, map_location)
    elif suffix in PICKLE_SUFFIXES:
        obj = _load_pickle(path, map_location)
    else:
        raise CheckpointError(
            f"{path}: unknown checkpoint type {suffix!r}; expected one of "
            f"{', '.join(PICKLE_SUFFIXES + (SAFETENSORS_SUFFIX,))}"
        )
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a dict")
    return obj


def _load_safetensors(path: Path, map_location) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file as st_load

    try:
        return st_load(path, device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from e


def _load_pickle(path: Path, map_location, mmap: bool = False) -> object:
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # torch reports a forbidden class as "... GLOBAL module.name ..."; anything else the
        # restricted unpickler trips on is garbage, not a security matter.
        found = re.search(r"GLOBAL\s+([\w.]+)", str(e))
        if found:
            raise CheckpointError(
                f"{path}: refused: unpickling it would run arbitrary code (it needs "
                f"{found.group(1)}, which torch.load(weights_only=True) does not allow). "
                + _CONVERT_HINT
            ) from e
        needed = _pickle_globals(path)
        if needed:
            raise CheckpointError(
                f"{path}: refused: unpickling it would run arbitrary code or build objects that "
                f"torch.load(weights_only=True) does not allow (it references {', '.join(needed)}). "
                + _CONVERT_HINT
            ) from e
        raise CheckpointError(f"{path}: corrupt or not a torch checkpoint ({_first_line(e)})") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({_first_line(e)})") from e


def _pickle_globals(path: Path, limit: int = 5) -> list[str]:
    """The ``module.name`` globals a plain (non-zip) pickle file references, read statically with
    :mod:`pickletools` (nothing is executed); [] for zip checkpoints or unreadable bytes.

    torch's restricted unpickler names the forbidden class only for the pickle protocols it
    parses; for a protocol-4/5 file written by ``pickle.dump`` it stops at the first unknown
    opcode, so the scan is what tells "needs code" from "corrupt"."""
    import pickletools
    import zipfile

    if zipfile.is_zipfile(path):
        return []
    found: list[str] = []
    strings: list[str] = []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                    strings.append(str(arg))
                elif op.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                if len(found) >= 50:
                    break
    except Exception:  # noqa: BLE001 - garbage bytes: the caller reports the file as corrupt
        pass
    unique = list(dict.fromkeys(found))
    return unique[:limit] + (["..."] if len(unique) > limit else [])


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def load_model_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The state dict stored at ``path``: ``ckpt["model"]`` of a runner checkpoint, or the dict
    itself when it already maps names to tensors. A Hugging Face folder gives all its shards merged.
    """
    path = Path(path)
    if path.is_dir():
        state: dict[str, torch.Tensor] = {}
        for shard in iter_checkpoint_shards(path):
            state.update(load_model_state(shard, map_location))
        return state
    obj = load_file(path, map_location)
    state = obj["model"] if isinstance(obj.get("model"), Mapping) else obj
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: not a state dict: entry {key!r} is a {type(value).__name__}, not a "
                f"tensor (top-level keys: {sorted(map(str, obj))[:8]})"
            )
    return dict(state)


def iter_checkpoint_shards(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a Hugging Face model folder, in shard order.

    Prefers safetensors over ``.bin`` and an index json over a single file, as transformers does.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a model folder (does it exist?)")
    for index_name, single_name in HF_LAYOUTS:
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: malformed index json ({e})") from e
            shards = [folder / name for name in sorted(set(weight_map.values()))]
            for shard in shards:
                if not shard.is_file():
                    raise CheckpointError(f"{index}: lists shard {shard.name}, which is missing from {folder}")
            return shards
        if (folder / single_name).is_file():
            return [folder / single_name]
    present = sorted(p.name for p in folder.iterdir())[:12]
    raise CheckpointError(
        f"{folder}: no model weights found (looked for "
        f"{', '.join(n for layout in HF_LAYOUTS for n in layout)}; folder has {present})"
    )


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------


# errno values that mean "this storage cannot take the write", with the words used in messages.
STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EFBIG: "file too large for the file system",
    errno.EIO: "input/output error (failing disk or lost network storage?)",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
# What torch's C++ zip writer says when a write fails (it reports no errno).
_TORCH_WRITE_FAILURES = re.compile(r"PytorchStreamWriter|unexpected pos|file write failed")
# Temporary siblings made by atomic_path / atomic_folder: ``.NAME.PID.RANDOM.tmp``.
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
# Below this many free bytes a failed write is blamed on a full device.
_NEARLY_FULL = 64 * 2**20


def _errno_of(exc: BaseException) -> int | None:
    """The OS error number behind ``exc``: an ``OSError``'s, or one named in a safetensors message
    (``... (os error 28)`` / ``code: 28``); None if there is none."""
    if isinstance(exc, OSError):
        return exc.errno
    if not (isinstance(exc, RuntimeError) or type(exc).__name__ == "SafetensorError"):
        return None
    found = re.search(r"os error (\d+)|code: (\d+)", str(exc))
    return int(found.group(1) or found.group(2)) if found else None


def is_storage_error(exc: BaseException) -> bool:
    """True if ``exc`` means the storage refused a write (full, read-only, quota, I/O error, no
    permission), whether it comes from the OS, from torch's zip writer or from safetensors."""
    if isinstance(exc, StorageError):
        return False  # already translated
    code = _errno_of(exc)
    if code is not None:
        return code in STORAGE_ERRNOS
    return isinstance(exc, RuntimeError) and bool(_TORCH_WRITE_FAILURES.search(str(exc)))


def _existing_parent(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path.parent != path:
        path = path.parent
    return path if path.is_dir() else path.parent


def storage_cause(exc: BaseException, path: str | os.PathLike) -> str:
    """Why a write to ``path`` failed, in words: from the error number when there is one, else from
    the state of the device (read-only flag, free space), else the error's first line."""
    code = _errno_of(exc)
    if code is not None:
        return STORAGE_ERRNOS.get(code, os.strerror(code).lower())
    try:
        st = os.statvfs(_existing_parent(Path(path)))
    except OSError:
        return f"write failed ({_first_line(exc)})"
    if st.f_flag & os.ST_RDONLY:
        return "read-only file system"
    free = st.f_bavail * st.f_frsize
    if free < _NEARLY_FULL:
        return f"no space left on device ({free / 2**20:.1f} MiB free)"
    return f"write failed ({_first_line(exc)}; {free / 2**30:.1f} GiB free there)"


def storage_error(exc: BaseException, path: str | os.PathLike, what: str = "cannot write",
                  atomic: bool = True) -> StorageError:
    """A :class:`StorageError` naming ``path`` and the cause of ``exc`` (see :func:`storage_cause`);
    ``atomic``: the failed write was an atomic one (the message then says nothing was replaced)."""
    name = getattr(exc, "filename", None) if isinstance(exc, OSError) else None
    where = f" (at {name})" if name and str(name) != str(path) and not _TEMP_NAME.match(Path(name).name) else ""
    cause = storage_cause(exc, path)
    tail = "; nothing there was replaced" if atomic else ""
    return StorageError(f"{path}: {what}: {cause}{where}{tail}", path, cause)


def _temp_sibling(path: Path) -> Path:
    """A fresh hidden name next to ``path``: ``.NAME.PID.RANDOM.tmp`` (see :func:`remove_stale_temporaries`)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (someone else's), or we cannot tell: leave its files alone
    return True


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def remove_stale_temporaries(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete the temporary files and folders that interrupted atomic saves left in ``folder``.

    Only names of the form ``.NAME.PID.RANDOM.tmp`` (what :func:`atomic_path` and
    :func:`atomic_folder` make) whose process ``PID`` no longer runs are removed; with ``name``,
    only those of that final name. Returns what was removed (each is logged).
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in sorted(folder.iterdir()):
        found = _TEMP_NAME.match(entry.name)
        if not found or (name is not None and found.group("name") != name) or _pid_alive(int(found.group("pid"))):
            continue
        try:
            _remove(entry)
        except OSError as e:
            logger.warning("could not remove %s, left by an interrupted save: %s", entry, e)
            continue
        logger.info("removed %s, left by an interrupted save of %s", entry, found.group("name"))
        removed.append(entry)
    return removed


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if is_storage_error(e) or isinstance(e, (FileExistsError, NotADirectoryError)):
            raise storage_error(e, path.parent, "cannot create the folder") from e
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on a clean exit, fsync it and move it onto ``path``.

    If the block raises (or the process dies) the final name is untouched: it keeps its old
    content or stays absent, and the temporary file is removed (or, after a kill, left as a hidden
    ``.NAME.PID.RANDOM.tmp`` that never shadows a real checkpoint and that
    :func:`remove_stale_temporaries` clears). A full disk, a read-only file system and the like
    raise :class:`~videollm.errors.StorageError` naming ``path`` and the cause.
    """
    path = Path(path)
    _make_parent(path)
    tmp = _temp_sibling(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # a full disk may only show here (delayed allocation, NFS)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            _remove(tmp)
        if is_storage_error(exc):
            raise storage_error(exc, path) from exc
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on a clean exit, move it onto ``path``.

    What the block writes becomes visible under ``path`` only when it is complete. If the block
    raises, the temporary folder is deleted and ``path`` is untouched: a retry starts clean. An
    existing ``path`` must be empty, unless ``replace``: then it is moved aside, the new folder
    moved in, and only then is the old one deleted (a kill between the two renames leaves both as
    hidden ``.NAME.*.tmp`` siblings, the old one intact). Temporary folders of killed earlier
    attempts are removed first. Storage failures raise :class:`~videollm.errors.StorageError`.
    """
    path = Path(os.path.abspath(path))
    _make_parent(path)
    remove_stale_temporaries(path.parent, path.name)
    tmp = _temp_sibling(path)
    try:
        tmp.mkdir()
        yield tmp
        old = None
        if path.exists() and not path.is_dir():
            raise StorageError(f"{path}: exists and is not a folder; nothing there was replaced")
        if path.exists() and any(path.iterdir()):
            if not replace:
                raise StorageError(f"{path}: appeared (not empty) while it was being written; the new "
                                   f"one was discarded")
            old = _temp_sibling(path)
            os.rename(path, old)
        elif path.exists():
            path.rmdir()
        try:
            os.rename(tmp, path)
        except BaseException:
            if old is not None:
                os.rename(old, path)  # put the old one back
            raise
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            _remove(tmp)
        if isinstance(exc, StorageError) and exc.cause is not None:  # from a file inside: name the folder
            raise StorageError(f"{path}: cannot write: {exc.cause} (at {exc.path}); nothing there was "
                               "replaced and the partial output was removed", path, exc.cause) from exc
        if is_storage_error(exc):
            raise storage_error(exc, path) from exc
        raise


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not possible on every platform/filesystem.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _WriteAll:
    """A file object for ``torch.save`` that writes every byte or raises the ``OSError`` (with its
    errno): torch's zip writer, given a path, reports a full disk only as ``unexpected pos``."""

    def __init__(self, f) -> None:
        self.f = f

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            n = self.f.write(view[done:])
            if not n:
                raise OSError(errno.EIO, "write made no progress", self.f.name)
            done += n
        return done

    def flush(self) -> None:
        pass


def save_atomic(obj: object, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, all or nothing (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb", buffering=0) as f:
        torch.save(obj, _WriteAll(f))


def save_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Save ``tensors`` as a safetensors file, all or nothing.

    ``{"format": "pt"}`` is added to the metadata: transformers refuses safetensors files without it.
    """
    from safetensors.torch import save_file

    meta = {"format": "pt", **dict(metadata or {})}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)


# ----------------------------------------------------------------------------------------------
# Reporting missing / unexpected keys
# ----------------------------------------------------------------------------------------------


def report_load(
    missing: Iterable[str],
    unexpected: Iterable[str],
    *,
    expected_missing_prefixes: Iterable[str] = (),
    expected_unexpected_patterns: Iterable[str] = (),
    strict: bool = True,
    source: str = "checkpoint",
) -> str:
    """Summarise a ``load_state_dict(strict=False)`` result in one message, and judge it.

    Args:
        missing / unexpected: the two key lists ``load_state_dict`` returns.
        expected_missing_prefixes: key prefixes that may be missing (e.g. the frozen
            ``"llama_model."``, ``"visual_encoder."``, which branch checkpoints do not hold).
        expected_unexpected_patterns: regular expressions (``re.search``) for keys the file may
            carry that the model does not have (e.g. ``r"rotary_emb\\.inv_freq$"`` of old checkpoints).
        strict: raise :class:`CheckpointError` if any key falls outside the expected sets;
            otherwise log a warning.
        source: the file name, for the message.

    Returns:
        The summary (also logged).
    """
    prefixes = tuple(expected_missing_prefixes)
    patterns = [re.compile(p) for p in expected_unexpected_patterns]
    missing, unexpected = list(missing), list(unexpected)
    bad_missing = [k for k in missing if not k.startswith(prefixes)]
    bad_unexpected = [k for k in unexpected if not any(p.search(k) for p in patterns)]
    n_ok_missing = len(missing) - len(bad_missing)
    n_ok_unexpected = len(unexpected) - len(bad_unexpected)

    lines = [f"{source}: loaded with {len(missing)} missing and {len(unexpected)} unexpected keys"]
    if bad_missing:
        lines.append(f"  NOT expected, missing from the file ({len(bad_missing)}): {_group(bad_missing)}")
    if bad_unexpected:
        lines.append(f"  NOT expected, in the file but not in the model ({len(bad_unexpected)}): {_group(bad_unexpected)}")
    if n_ok_missing:
        lines.append(f"  expected missing: {n_ok_missing} (under {', '.join(prefixes)})")
    if n_ok_unexpected:
        lines.append(f"  expected unexpected: {n_ok_unexpected} (matching {', '.join(p.pattern for p in patterns)})")
    summary = "\n".join(lines)

    if bad_missing or bad_unexpected:
        if strict:
            raise CheckpointError(
                summary + "\n  Is this the right checkpoint for this model? "
                "(pass strict=False to load anyway)"
            )
        logger.warning(summary)
    else:
        logger.info(summary)
    return summary


def _group(keys: list[str], per_group: int = 3) -> str:
    """``"llama_proj: 2 [llama_proj.weight, llama_proj.bias]; ..."`` grouped by top-level module."""
    groups: dict[str, list[str]] = defaultdict(list)
    for key in keys:
        groups[key.split(".", 1)[0]].append(key)
    parts = []
    for prefix, names in groups.items():
        shown = ", ".join(names[:per_group]) + (", ..." if len(names) > per_group else "")
        parts.append(f"{prefix}: {len(names)} [{shown}]")
    return "; ".join(parts)
