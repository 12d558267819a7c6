"""Frozen-encoder feature cache: run a model's frozen front once, train and evaluate from its outputs.

Every seed system keeps its vision encoder frozen (Video-LLaMA: EVA ViT-g + ``ln_vision`` + the
BLIP-2 Q-Former per frame), yet training on raw clips decodes every clip and runs that encoder
again in every epoch. The cache stores the front's outputs per sample, written by
``python -m videollm.features cache --cfg-path RECIPE --out DIR``, and a dataset entry's
``feature_cache: DIR`` option makes the dataset yield them in place of pixels.

Which part is the front comes from the model (the optional contract methods of
:class:`~videollm.models.base.VideoLLM`: ``frozen_front_prefixes``, ``frozen_front(media)``,
``frozen_fingerprint()``, ``Media("features")`` in ``encode_media`` and batches marked
``batch[FEATURES_KEY]``); whether it is frozen comes from the model's ``freeze_plan()``: a front
parameter that trains under the config refuses the cache, naming the config key of the rule.

Layout of ``DIR``::

    manifest.json                  what produced the cache: {"version", "producer": {"model": the
                                   model's frozen_fingerprint(), "run": autocast settings}, "views",
                                   "seed", "shard_size", "datasets": {name: {"config": the dataset
                                   entry (processors, sampling, frames, build_info), "splits":
                                   {split: {"num_samples", "num_shards"}}}}}
    <name>/<split>/v<view>-<shard>.safetensors   tensors "<index>.<field>": the front's output
                                   under the sample's media field (e.g. "image" (T, Q, H)) and any
                                   other tensor field of the sample
    <name>/<split>/v<view>-<shard>.json          the shard's record, written last and atomically
                                   (its presence marks the shard complete): file size, sha256, and
                                   per sample its non-tensor fields or its bad-sample marker
    index.json                     written when every shard is complete: shards per split, counts

Shard ``s`` of a split holds the samples ``[s * shard_size, (s + 1) * shard_size)``; under
torchrun the shards are dealt round-robin over the ranks. A build killed at any point resumes:
completed shards (their record present) are skipped, an incomplete one is rewritten whole, so no
sample is lost or written twice. A bad clip is stored as its marker (path, reason) and the cached
dataset returns that same marker, so bad samples are skipped and counted exactly as in training.

Exactness: with deterministic processing (``alpro_video_eval``, uniform sampling), training from
the cache gives the loss and gradients of training from the clips (fp32, tested to 1e-6). Random
augmentation (``alpro_video_train``'s crops, ``headtail`` sampling) cannot be cached exactly:
``--views K`` stores K augmented views per sample, view ``k`` loaded with its RNGs seeded from
``(run.seed, dataset, split, k, index)``, and the cached dataset serves one of them per access,
drawn with the run's seeded per-sample RNG. That is a different augmentation regime (K fixed
views instead of a fresh draw every epoch), not the same one.

A cache is refused with :class:`~videollm.errors.ConfigError` when what produced it differs from
the present config or model (the message lists every differing key, e.g.
``model.weights``, ``datasets.webvid.vis_processor.train.n_frms``), and a shard whose bytes do
not match its record is named as corrupt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset, IterableDataset

from videollm.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.json"
MEDIA_FIELDS = ("image", "video")  # the sample field holding the processed medium
# Dataset entry keys that do not change what a sample is (left out of the recorded config).
NOT_RECORDED = ("feature_cache", "sample_ratio")


# ----------------------------------------------------------------------------------------
# What produced a cache, and what differs
# ----------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def dataset_record(node: Any) -> Dict[str, Any]:
    """The part of a ``datasets.<name>`` entry that decides its samples (processors, frames,
    sampling, build_info, limits), as plain JSON data."""
    values = _plain(node) or {}
    return json.loads(json.dumps({k: v for k, v in values.items() if k not in NOT_RECORDED}, sort_keys=True,
                                 default=str))


def run_record(run: Any, model: Any) -> Dict[str, Any]:
    """The run settings that change the front's numbers: the device type and its autocast."""
    run = run or {}
    device = str(run.get("device", "cpu"))
    device_type = "cuda" if device.startswith("cuda") else device
    amp = bool(run.get("amp", False))
    dtype = str(run.get("amp_dtype", "bf16")) if amp else "none"
    if amp and device_type != "cuda" and dtype != "bf16":
        dtype = "none"  # fp16 autocast is CUDA-only: such a CPU run trains in fp32 (the runner's rule)
    return {"device_type": device_type, "autocast": dtype}


def differences(cached: Any, current: Any, where: str) -> List[str]:
    """Every key path at which ``cached`` and ``current`` differ, with both values."""
    if isinstance(cached, dict) and isinstance(current, dict):
        out: List[str] = []
        for key in sorted(set(cached) | set(current)):
            a, b = cached.get(key, "<absent>"), current.get(key, "<absent>")
            out += differences(a, b, f"{where}.{key}" if where else str(key))
        return out
    if cached != current:
        return [f"{where}: {json.dumps(cached, default=str)} in the cache, {json.dumps(current, default=str)} now"]
    return []


def refuse_differences(diffs: Sequence[str], root: Path) -> None:
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise ConfigError(f"feature cache {root}: made by another setting ({shown}); rebuild it with "
                          "`python -m videollm.features cache` into a new folder, or drop feature_cache")


# ----------------------------------------------------------------------------------------
# The model side: is the front frozen, what produced it
# ----------------------------------------------------------------------------------------


def check_front_frozen(model: Any) -> None:
    """Refuse a model whose frozen front is missing or trains under its freeze plan."""
    arch = getattr(model, "arch", "") or type(model).__name__
    prefixes = tuple(getattr(model, "frozen_front_prefixes", ()) or ())
    if not prefixes:
        raise ConfigError(f"model.arch {arch}: declares no frozen front (frozen_front_prefixes); it cannot use a "
                          "feature cache")
    plan = model.freeze_plan()
    for name, _ in model.named_parameters():
        if not any(name.startswith(p) for p in prefixes) or not plan.trainable(name):
            continue
        rule = next((r for r in reversed(plan.rules) if r.matches(name)), None)
        key = f"model.{rule.why}" if rule is not None and rule.why else "the model's freeze plan"
        raise ConfigError(f"{key}: {name} is part of {arch}'s frozen front but trains under this config, so its "
                          f"outputs change during training and cannot be cached; freeze it ({key}) or train from the "
                          "raw data")


def model_record(model: Any) -> Dict[str, Any]:
    try:
        return _plain(model.frozen_fingerprint())
    except NotImplementedError as exc:
        raise ConfigError(f"model.arch {getattr(model, 'arch', '?')}: {exc}") from None


def check_feature_caches(model: Any, datasets: Dict[str, Dict[str, Any]], run: Any = None) -> None:
    """Check every cached split of ``datasets`` against ``model`` (and the run's autocast):
    the front must be frozen and its fingerprint the recorded one. A no-op without caches."""
    cached = [d for splits in (datasets or {}).values() for d in splits.values() if isinstance(d, FeatureCacheDataset)]
    if not cached:
        return
    check_front_frozen(model)
    current = {"model": model_record(model), "run": run_record(run, model)}
    seen = set()
    for ds in cached:
        if ds.root in seen:
            continue
        seen.add(ds.root)
        refuse_differences(differences(ds.manifest["producer"], current, ""), ds.root)


# ----------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def shard_stem(view: int, shard: int) -> str:
    return f"v{view}-{shard:05d}"


def _split_dir(root: Path, name: str, split: str) -> Path:
    return root / name / split


def write_shard(directory: Path, view: int, shard: int, start: int, samples: Sequence[Tuple[int, Any]]) -> Dict[str, Any]:
    """Write one shard (``samples``: (index, sample dict with the front's output, or BadSample));
    the record (``.json``) goes last, atomically, and marks the shard complete. Returns it."""
    from safetensors.torch import save_file

    from videollm.datasets.bad_samples import BadSample

    directory.mkdir(parents=True, exist_ok=True)
    stem = shard_stem(view, shard)
    tensors: Dict[str, torch.Tensor] = {}
    entries: List[Dict[str, Any]] = []
    for index, sample in samples:
        if isinstance(sample, BadSample):
            entries.append({"index": index, "bad": [sample.path, sample.reason, sample.detail]})
            continue
        fields: Dict[str, Any] = {}
        names: List[str] = []
        for key, value in sample.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
                names.append(key)
            else:
                try:
                    json.dumps(value)
                except TypeError:
                    raise DataError(f"sample {index}: field {key!r} ({type(value).__name__}) cannot be stored in a "
                                    "feature cache (tensors and JSON values only)") from None
                fields[key] = value
        entries.append({"index": index, "fields": fields, "tensors": names})
    data_path = directory / f"{stem}.safetensors"
    tmp = data_path.with_name(data_path.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"shard": stem})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, data_path)
    record = {"shard": shard, "view": view, "start": start, "stop": start + len(samples),
              "file": data_path.name, "bytes": data_path.stat().st_size, "sha256": _sha256(data_path),
              "samples": entries}
    _atomic_write_json(directory / f"{stem}.json", record)
    return record


def read_shard_record(directory: Path, view: int, shard: int) -> Optional[Dict[str, Any]]:
    """The record of a complete shard, or None (not written, or its data file is missing/short)."""
    path = directory / f"{shard_stem(view, shard)}.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    data = directory / str(record.get("file", ""))
    if not data.is_file() or data.stat().st_size != record.get("bytes"):
        return None
    return record


def verify_shard(directory: Path, record: Dict[str, Any]) -> None:
    """DataError naming the shard when its bytes are not the recorded ones (size or sha256)."""
    path = directory / record["file"]
    if not path.is_file():
        raise DataError(f"feature cache shard {path}: missing; rebuild it (rerun the cache command)")
    size = path.stat().st_size
    if size != record["bytes"]:
        raise DataError(f"feature cache shard {path}: corrupt ({size} bytes, the record says {record['bytes']}); "
                        "delete it and its .json and rerun the cache command")
    if _sha256(path) != record["sha256"]:
        raise DataError(f"feature cache shard {path}: corrupt (sha256 differs from its record); delete it and its "
                        ".json and rerun the cache command")


def verify_cache(root: os.PathLike | str) -> Dict[str, int]:
    """Check every shard of a complete cache; returns {"shards", "samples", "bad"}."""
    root = Path(root)
    index = _read_json(root / INDEX, f"feature cache {root}: no {INDEX} (the build is not complete)")
    out = {"shards": 0, "samples": 0, "bad": 0}
    for key, info in index["splits"].items():
        name, split = key.split("/", 1)
        directory = _split_dir(root, name, split)
        for view in range(int(index["views"])):
            for shard in range(int(info["num_shards"])):
                record = read_shard_record(directory, view, shard)
                if record is None:
                    raise DataError(f"feature cache {directory}: shard {shard_stem(view, shard)} missing or corrupt")
                verify_shard(directory, record)
                out["shards"] += 1
                out["samples"] += len(record["samples"])
                out["bad"] += sum("bad" in e for e in record["samples"])
    return out


def _read_json(path: Path, missing: str) -> Dict[str, Any]:
    if not path.is_file():
        raise ConfigError(missing)
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); the cache is damaged, rebuild it") from None


# ----------------------------------------------------------------------------------------
# Reading: the cached dataset
# ----------------------------------------------------------------------------------------


class FeatureCacheDataset(Dataset):
    """A built dataset's split served from a feature cache: same length, same non-media fields,
    the front's output in the media field (e.g. ``"image"``: (T, Q, H) for Video-LLaMA), the
    same bad-sample markers; its ``collater`` is the dataset's own, marking the batch
    ``batch[FEATURES_KEY] = True`` so the model skips its frozen front. Other attributes
    (``model_facts``, ...) are the wrapped dataset's. Never decodes."""

    def __init__(self, root: os.PathLike | str, name: str, split: str, dataset: Dataset, config: Any) -> None:
        self.root = Path(root)
        self.cache_name, self.split, self.dataset = name, split, dataset
        self.manifest = _read_json(self.root / MANIFEST, f"datasets.{name}.feature_cache: {self.root} holds no "
                                   f"{MANIFEST}; build it with `python -m videollm.features cache`")
        if self.manifest.get("version") != CACHE_VERSION:
            raise ConfigError(f"feature cache {self.root}: version {self.manifest.get('version')}, expected "
                              f"{CACHE_VERSION}; rebuild it")
        entry = self.manifest["datasets"].get(name)
        if entry is None:
            raise ConfigError(f"datasets.{name}.feature_cache: {self.root} has no dataset {name!r} (it holds "
                              f"{sorted(self.manifest['datasets'])})")
        refuse_differences(differences(entry["config"], dataset_record(config), f"datasets.{name}"), self.root)
        if split not in entry["splits"]:
            raise ConfigError(f"datasets.{name}.feature_cache: {self.root} has no split {split!r} of {name}")
        index = _read_json(self.root / INDEX, f"feature cache {self.root}: incomplete (no {INDEX}); rerun "
                           "`python -m videollm.features cache` with the same arguments to finish it")
        self.num_samples = int(entry["splits"][split]["num_samples"])
        n = len(dataset)  # type: ignore[arg-type]
        if n != self.num_samples:
            refuse_differences([f"datasets.{name}.{split}: {self.num_samples} samples in the cache, {n} now"],
                               self.root)
        self.views = int(index["views"])
        self.shard_size = int(self.manifest["shard_size"])
        self.directory = _split_dir(self.root, name, split)
        self._records: Dict[Tuple[int, int], Dict[str, Any]] = {}
        self._handles: Dict[Tuple[int, int], Any] = {}

    def __len__(self) -> int:
        return self.num_samples

    def __getattr__(self, item: str) -> Any:  # model_facts, vis_processor, ... of the wrapped dataset
        if item.startswith("__") or item in ("dataset", "_handles", "_records"):
            raise AttributeError(item)
        return getattr(self.dataset, item)

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}  # safetensors handles are per process
        return state

    def _shard(self, view: int, shard: int) -> Tuple[Dict[str, Any], Any]:
        key = (view, shard)
        if key not in self._handles:
            from safetensors import safe_open

            record = read_shard_record(self.directory, view, shard)
            if record is None:
                raise DataError(f"feature cache {self.directory}: shard {shard_stem(view, shard)} is missing or "
                                "corrupt; rerun the cache command")
            verify_shard(self.directory, record)
            try:
                handle = safe_open(str(self.directory / record["file"]), framework="pt")
            except Exception as exc:  # noqa: BLE001 - a damaged header
                raise DataError(f"feature cache shard {self.directory / record['file']}: corrupt ({exc})") from None
            self._records[key] = {e["index"]: e for e in record["samples"]}
            if len(self._handles) >= 8:  # a few open shards per process
                self._handles.pop(next(iter(self._handles)))
            self._handles[key] = handle
        return self._records[key], self._handles[key]

    def __getitem__(self, index: int) -> Any:
        from videollm.datasets.bad_samples import BadSample

        index = int(index)
        # one of the K views, drawn from the per-sample RNG the loader seeds with the run's seed
        view = random.randrange(self.views) if self.views > 1 else 0
        entries, handle = self._shard(view, index // self.shard_size)
        entry = entries.get(index)
        if entry is None:
            raise DataError(f"feature cache {self.directory}: sample {index} missing from shard "
                            f"{shard_stem(view, index // self.shard_size)}")
        if "bad" in entry:
            path, reason, detail = entry["bad"]
            return BadSample(path, reason, detail)
        sample = dict(entry["fields"])
        for key in entry["tensors"]:
            sample[key] = handle.get_tensor(f"{index}.{key}")
        return sample

    def collater(self, samples: Sequence[Any]) -> Dict[str, Any]:
        from videollm.datasets.base import collate_caption
        from videollm.models.base import FEATURES_KEY

        batch = getattr(self.dataset, "collater", collate_caption)(samples)
        if batch.get("num_samples", 1):
            batch[FEATURES_KEY] = True
        return batch


def wrap_cached(name: str, splits: Dict[str, Dataset], config: Any, root: str) -> Dict[str, Dataset]:
    """``{split: FeatureCacheDataset}`` for a dataset entry with ``feature_cache: root``; a split
    the cache was not built for (``--splits``) stays raw, with a warning."""
    manifest = _read_json(Path(root) / MANIFEST, f"datasets.{name}.feature_cache: {root} holds no {MANIFEST}; "
                          "build it with `python -m videollm.features cache`")
    cached = (manifest.get("datasets", {}).get(name) or {}).get("splits", {})
    out: Dict[str, Dataset] = {}
    for split, ds in splits.items():
        if cached and split not in cached:
            logger.warning("datasets.%s.feature_cache: %s has no %s split; it is read from the raw data", name, root,
                           split)
            out[split] = ds
        else:
            out[split] = FeatureCacheDataset(root, name, split, ds, config)
    return out


# ----------------------------------------------------------------------------------------
# Writing: the cache build
# ----------------------------------------------------------------------------------------


def _media_field(sample: Dict[str, Any]) -> str:
    for key in MEDIA_FIELDS:
        if isinstance(sample.get(key), torch.Tensor):
            return key
    raise DataError(f"sample has no media tensor in {MEDIA_FIELDS} (fields: {sorted(sample)})")


class _ViewLoader(Dataset):
    """Items ``(view, index)`` of one split, each loaded under its own seed (picklable for workers)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: Tuple[int, int]) -> Tuple[int, Any]:
        from videollm.datasets.base import derive_seed, run_seeded

        view, index = item
        return index, run_seeded(derive_seed(self.seed, view, index), lambda: self.dataset[index])


def _identity(items: Any) -> Any:
    return items


def _front(model: Any, samples: List[Tuple[int, Any]], autocast: Optional[torch.dtype]) -> List[Tuple[int, Any]]:
    """Replace each good sample's medium by the model's frozen-front output (batched)."""
    from videollm.datasets.bad_samples import BadSample
    from videollm.models.base import Media

    good = [(i, s) for i, s in samples if not isinstance(s, BadSample)]
    if good:
        fields = [_media_field(s) for _, s in good]
        media = [Media("image" if s[f].dim() == 3 else "video", s[f]) for (_, s), f in zip(good, fields)]
        ctx = torch.autocast("cpu", dtype=autocast) if autocast is not None else torch.autocast("cpu", enabled=False)
        with ctx:
            feats = model.frozen_front(media)
        for (_, s), f, x in zip(good, fields, feats):
            s[f] = x.detach().cpu()
    return samples


def build_cache(cfg: Any, out: os.PathLike | str, *, views: int = 1, shard_size: int = 64, batch_size: int = 8,
                num_workers: Optional[int] = None, splits: Optional[Sequence[str]] = None, rank: int = 0,
                world_size: int = 1, progress: bool = True, model: Any = None, datasets: Any = None,
                max_shards: Optional[int] = None) -> Dict[str, Any]:
    """Build (or finish) the feature cache of a loaded recipe ``cfg`` into ``out``; returns counts.

    Builds the recipe's model and datasets (their own processors and frame sampling) unless
    given, checks the front is frozen, writes ``manifest.json`` (or checks the existing one),
    then this rank's shards (``shard % world_size == rank``), skipping complete ones. Rank 0
    writes ``index.json`` when every shard of every rank is there (under torchrun call it after
    a barrier; :func:`main_cache` does). ``max_shards`` stops after that many new shards (tests).
    """
    from videollm.datasets.bad_samples import BadSample

    root = Path(out)
    if model is None or datasets is None:
        from videollm.tasks import setup_task

        task = setup_task(cfg)
        datasets = task.build_datasets(cfg) if datasets is None else datasets
        model = task.build_model(cfg) if model is None else model
    run = cfg.get("run", {}) or {}
    device = torch.device(str(run.get("device", "cpu")) if torch.cuda.is_available() or
                          not str(run.get("device", "cpu")).startswith("cuda") else "cpu")
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", rank % torch.cuda.device_count())
    check_front_frozen(model)
    model.place(device)
    rr = run_record(run, model)
    if rr["device_type"] == "cuda" and rr["autocast"] != "none":
        model.set_autocast_dtype({"fp16": torch.float16, "bf16": torch.bfloat16}[rr["autocast"]])
    cpu_autocast = torch.bfloat16 if (rr["device_type"] == "cpu" and rr["autocast"] == "bf16") else None
    model.eval()
    seed = int(run.get("seed", 0))
    producer = {"model": model_record(model), "run": rr}

    plan: List[Tuple[str, str, Dataset, int]] = []  # (name, split, dataset, num_shards)
    ds_entries: Dict[str, Any] = {}
    for name, by_split in datasets.items():
        node = cfg.datasets[name] if "datasets" in cfg and name in cfg.datasets else {}
        if node.get("feature_cache"):
            raise ConfigError(f"datasets.{name}.feature_cache: set in the recipe being cached; remove it (the cache "
                              "is built from the raw data)")
        entry = {"config": dataset_record(node), "splits": {}}
        for split, ds in by_split.items():
            if splits and split not in splits:
                continue
            if isinstance(ds, IterableDataset) or not hasattr(ds, "__len__"):
                raise ConfigError(f"datasets.{name}: a streaming dataset ({type(ds).__name__}) cannot be cached by "
                                  "index; cache a map-style dataset")
            n = len(ds)
            num_shards = (n + shard_size - 1) // shard_size
            entry["splits"][split] = {"num_samples": n, "num_shards": num_shards}
            plan.append((name, split, ds, num_shards))
        ds_entries[name] = entry
    manifest = {"version": CACHE_VERSION, "producer": producer, "views": int(views), "seed": seed,
                "shard_size": int(shard_size), "datasets": ds_entries}
    root.mkdir(parents=True, exist_ok=True)
    mpath = root / MANIFEST
    if mpath.is_file():  # resuming: it must be the same build
        old = _read_json(mpath, "")
        refuse_differences(differences({k: old.get(k) for k in manifest}, manifest, ""), root)
    elif rank == 0:
        _atomic_write_json(mpath, manifest)

    jobs: List[Tuple[str, str, Dataset, int, int]] = []
    k = 0
    for name, split, ds, num_shards in plan:
        for view in range(views):
            for shard in range(num_shards):
                if k % world_size == rank:
                    jobs.append((name, split, ds, view, shard))
                k += 1
    todo = [j for j in jobs if read_shard_record(_split_dir(root, j[0], j[1]), j[3], j[4]) is None]
    counts = {"shards_total": k, "shards_skipped": len(jobs) - len(todo), "shards_written": 0, "samples": 0,
              "bad": 0, "bad_by_reason": {}, "seconds": 0.0}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = sum(min(shard_size, len(j[2]) - j[4] * shard_size) for j in todo)  # type: ignore[arg-type]
        bar = tqdm(total=total, unit="clip", desc=f"cache rank {rank}", disable=rank != 0 and world_size > 1)
    workers = int(run.get("num_workers", 0) if num_workers is None else num_workers)
    t0 = time.perf_counter()
    for name, split, ds, view, shard in todo:
        if max_shards is not None and counts["shards_written"] >= max_shards:
            break
        start = shard * shard_size
        stop = min(len(ds), start + shard_size)  # type: ignore[arg-type]
        sample_seed = zlib.crc32(f"{seed}/{name}/{split}".encode())
        loader = torch.utils.data.DataLoader(
            _ViewLoader(ds, sample_seed), batch_size=batch_size, num_workers=workers, collate_fn=_identity,
            sampler=[(view, i) for i in range(start, stop)])
        done: List[Tuple[int, Any]] = []
        for items in loader:
            done += _front(model, items, cpu_autocast)
            if bar is not None:
                bar.update(len(items))
        write_shard(_split_dir(root, name, split), view, shard, start, done)
        counts["shards_written"] += 1
        counts["samples"] += len(done)
        for _, s in done:
            if isinstance(s, BadSample):
                counts["bad"] += 1
                counts["bad_by_reason"][s.reason] = counts["bad_by_reason"].get(s.reason, 0) + 1
    if bar is not None:
        bar.close()
    counts["seconds"] = time.perf_counter() - t0
    if rank == 0:
        counts["complete"] = finish_index(root)
    return counts


def finish_index(root: os.PathLike | str) -> bool:
    """Write ``index.json`` when every shard of the manifest is complete; returns whether it is."""
    root = Path(root)
    manifest = _read_json(root / MANIFEST, f"feature cache {root}: no {MANIFEST}")
    index: Dict[str, Any] = {"views": manifest["views"], "splits": {}, "samples": 0, "bad": 0, "bad_by_reason": {}}
    for name, entry in manifest["datasets"].items():
        for split, info in entry["splits"].items():
            directory = _split_dir(root, name, split)
            shards = []
            seen = 0
            for view in range(int(manifest["views"])):
                for shard in range(int(info["num_shards"])):
                    record = read_shard_record(directory, view, shard)
                    if record is None:
                        return False
                    got = [e["index"] for e in record["samples"]]
                    want = list(range(record["start"], record["stop"]))
                    if got != want:
                        raise DataError(f"feature cache {directory}: shard {shard_stem(view, shard)} holds samples "
                                        f"{got[:3]}..., expected {want[:3]}...; delete it and rerun")
                    seen += len(got)
                    for e in record["samples"]:
                        if "bad" in e:
                            index["bad"] += 1
                            reason = e["bad"][1]
                            index["bad_by_reason"][reason] = index["bad_by_reason"].get(reason, 0) + 1
                    shards.append({"file": record["file"], "sha256": record["sha256"], "bytes": record["bytes"]})
            if seen != int(info["num_samples"]) * int(manifest["views"]):
                raise DataError(f"feature cache {directory}: {seen} samples in the shards, expected "
                                f"{int(info['num_samples']) * int(manifest['views'])}")
            index["splits"][f"{name}/{split}"] = {"num_shards": info["num_shards"], "shards": shards}
            index["samples"] += seen
    _atomic_write_json(root / INDEX, index)
    return True


def cache_size(root: os.PathLike | str) -> int:
    """Bytes of the shard files of a cache."""
    return sum(p.stat().st_size for p in Path(root).rglob("*.safetensors"))


# ----------------------------------------------------------------------------------------
# The command (``python -m videollm.features cache``)
# ----------------------------------------------------------------------------------------


def add_cache_arguments(p: Any) -> None:
    p.add_argument("--cfg-path", required=True, help="the training (or evaluation) recipe whose datasets to cache")
    p.add_argument("--out", required=True, help="the cache folder (a rerun with the same arguments resumes)")
    p.add_argument("--options", nargs="+", default=None, help="key=value overrides of the recipe")
    p.add_argument("--views", type=int, default=1,
                   help="augmented views per sample (K>1 only for random processing; a different regime)")
    p.add_argument("--shard-size", type=int, default=64, help="samples per shard")
    p.add_argument("--batch-size", type=int, default=8, help="samples per frozen-front batch")
    p.add_argument("--num-workers", type=int, default=None, help="decoding workers (default run.num_workers)")
    p.add_argument("--splits", nargs="+", default=None, help="only these splits (default: all)")
    p.add_argument("--verify", action="store_true", help="only check every shard of an existing cache")
    p.set_defaults(func=run_cache_command)


def run_cache_command(args: Any) -> int:
    from videollm.config import load_config
    from videollm.registry import import_all

    if args.verify:
        counts = verify_cache(args.out)
        print(f"{args.out}: {counts['shards']} shards, {counts['samples']} samples ({counts['bad']} bad): intact")
        return 0
    if args.views < 1 or args.shard_size < 1 or args.batch_size < 1:
        raise ConfigError("--views, --shard-size and --batch-size must be >= 1")
    import_all()
    cfg = load_config(args.cfg_path, args.options)
    rank, world = 0, 1
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("nccl" if torch.cuda.is_available() and str(cfg.run.get("device", "cpu")) != "cpu"
                                else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    try:
        import numpy as np

        seed = int(cfg.run.get("seed", 0))  # train.py's seeding while building: the same random tiny weights
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        counts = build_cache(cfg, args.out, views=args.views, shard_size=args.shard_size,
                             batch_size=args.batch_size, num_workers=args.num_workers, splits=args.splits,
                             rank=rank, world_size=world)
        if distributed:
            import torch.distributed as dist

            dist.barrier()
            every: List[Any] = [None] * world
            dist.all_gather_object(every, counts)
            for other in every[1:]:  # this run's totals over the ranks
                for key in ("shards_written", "shards_skipped", "samples", "bad"):
                    counts[key] += other[key]
                for reason, n in other["bad_by_reason"].items():
                    counts["bad_by_reason"][reason] = counts["bad_by_reason"].get(reason, 0) + n
                counts["seconds"] = max(counts["seconds"], other["seconds"])
            if rank == 0:
                counts["complete"] = finish_index(args.out)
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank == 0:
        bad = ", ".join(f"{r}: {n}" for r, n in sorted(counts["bad_by_reason"].items())) or "none"
        print(f"{args.out}: {counts['shards_written']} shards written, {counts['shards_skipped']} already there, "
              f"{counts['samples']} samples this run ({counts['bad']} bad: {bad}), {counts['seconds']:.1f} s; "
              f"{'complete' if counts.get('complete') else 'INCOMPLETE (rerun to finish)'}; "
              f"{cache_size(args.out) / 1e6:.1f} MB")
    return 0 if counts.get("complete", True) else 1
