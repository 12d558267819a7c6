"""Mixing datasets for training: one dataset per batch, chosen in proportion to ``sample_ratio``.

This is the original's ``MultiIterLoader`` semantics (homogeneous batches: the caption and the
instruction paths of the model take different keys), made deterministic and resumable:

* every dataset has its own DataLoader: ``drop_last``, shuffling by a
  :class:`~torch.utils.data.DistributedSampler` (``num_replicas``/``rank`` from
  ``torch.distributed`` when it is initialised, else one replica), ``num_workers`` workers,
  ``persistent_workers`` when there are workers (map-style datasets; shard streams re-create
  their workers each pass so that the new epoch reaches them), a ``worker_init_fn`` seeding
  ``random``/``numpy`` per worker, ``pin_memory`` only when CUDA is available;
* iteration is infinite: when a dataset's pass ends, the next pass starts with ``set_epoch``
  (a new shuffle);
* the dataset of each batch is drawn from a private ``random.Random(seed)``; each map-style
  sample is loaded with its RNGs seeded from ``(seed, dataset, epoch, index)``, so random crops
  and frame choices do not depend on the worker that loads them;
* ``state_dict()`` holds the choice RNG state and, per dataset, the epoch and the number of
  batches consumed in it; after ``load_state_dict`` the loader yields exactly the batches an
  uninterrupted run would have (map-style datasets skip the consumed part of the pass in the
  sampler, without loading it; shard streams re-read and drop the consumed batches).

Bad samples: batches carry ``bad_samples`` and ``num_samples`` (see ``bad_samples.py``). A batch
in which every sample was bad is skipped; its reports are carried into the next batch returned,
so every report reaches the caller. ``max_empty_batches`` empty batches in a row from one dataset
raise :class:`~videollm.errors.DataError` (the data is unusable).

Each batch also gets ``batch["dataset"]`` (the name it came from). ``stats`` counts the batches
returned per dataset.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Callable, Dict, Iterator, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from videollm.datasets.bad_samples import is_empty_batch
from videollm.datasets.base import collate_caption, derive_seed, dist_info, run_seeded
from videollm.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed ``random`` and ``numpy`` from the worker's torch seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


class _SeededDataset(Dataset):
    """Wraps a map-style dataset; items are ``(epoch, index)``, loaded under a derived seed."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: Any) -> Any:
        epoch, index = item
        return run_seeded(derive_seed(self.seed, epoch, index), lambda: self.dataset[index])


class _ResumableSampler(DistributedSampler):
    """DistributedSampler yielding ``(epoch, index)``; ``skip`` drops the first indices once."""

    skip = 0

    def __iter__(self) -> Iterator[Any]:
        epoch, skip = self.epoch, self.skip
        self.skip = 0
        for i, index in enumerate(super().__iter__()):
            if i >= skip:
                yield (epoch, index)


class _ProcessedCollate:
    """A dataset's collater followed by the model's batch processor (picklable for workers)."""

    def __init__(self, collate: Callable, processor: Callable) -> None:
        self.collate = collate
        self.processor = processor

    def __call__(self, samples: Any) -> Any:
        batch = self.collate(samples)
        return batch if is_empty_batch(batch) else self.processor(batch)


class _Stream:
    """One dataset's infinite sequence of batches, with its position (epoch, consumed)."""

    def __init__(self, name: str, dataset: Dataset, batch_size: int, num_workers: int, seed: int, shuffle: bool,
                 drop_last: bool, pin_memory: bool, batch_processor: Optional[Callable] = None) -> None:
        self.name = name
        self.batch_size = batch_size
        self.epoch = 0
        self.consumed = 0
        self._it: Optional[Iterator[Any]] = None
        collate: Callable = getattr(dataset, "collater", collate_caption)
        if batch_processor is not None:
            collate = _ProcessedCollate(collate, batch_processor)
        self.iterable = isinstance(dataset, IterableDataset)
        common = dict(batch_size=batch_size, num_workers=num_workers, collate_fn=collate, drop_last=drop_last,
                      pin_memory=pin_memory, worker_init_fn=seed_worker if num_workers > 0 else None,
                      generator=torch.Generator().manual_seed(seed))
        if self.iterable:
            self.dataset = dataset
            self.sampler = None
            self.loader = DataLoader(dataset, **common)
        else:
            rank, world = dist_info()
            n = len(dataset)  # type: ignore[arg-type]
            if drop_last and n // world < batch_size:
                raise DataError(f"dataset {name}: {n} samples over {world} rank(s) cannot fill one batch of "
                                f"{batch_size} (drop_last); lower the batch size or add data")
            self.dataset = _SeededDataset(dataset, seed)
            self.sampler = _ResumableSampler(self.dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
            self.loader = DataLoader(self.dataset, sampler=self.sampler, persistent_workers=num_workers > 0, **common)

    def _start_pass(self) -> None:
        if self.iterable:
            self.dataset.set_epoch(self.epoch)  # type: ignore[attr-defined]
            self._it = iter(self.loader)
            for _ in range(self.consumed):  # resume: re-read and drop the consumed batches
                next(self._it)
        else:
            self.sampler.set_epoch(self.epoch)
            self.sampler.skip = self.consumed * self.batch_size
            self._it = iter(self.loader)

    def next(self) -> Dict[str, Any]:
        for _ in range(2):
            if self._it is None:
                self._start_pass()
            try:
                batch = next(self._it)  # type: ignore[arg-type]
            except StopIteration:
                self._it = None
                if self.consumed == 0:
                    raise DataError(f"dataset {self.name}: a whole pass gave no batch of {self.batch_size} samples") from None
                self.epoch += 1
                self.consumed = 0
                continue
            self.consumed += 1
            return batch
        raise DataError(f"dataset {self.name}: no batch after starting a new pass")  # pragma: no cover

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.consumed = int(state["consumed"])
        self._it = None


class MixedLoader:
    """Infinite iterator of homogeneous batches over several datasets; see the module docstring.

    Args:
        datasets: ``{name: Dataset}`` (map-style or the shard IterableDatasets).
        sample_ratios: ``{name: weight}``; a missing name has weight 1.
        batch_size, num_workers: per DataLoader.
        seed: fixes the dataset choices, the shuffles and the per-sample augmentation seeds.
        batch_processor: the model's processor (``model.batch_processor()``), applied to every
            collated batch inside the loader's workers: datasets never know the model.
    """

    def __init__(self, datasets: Dict[str, Dataset], sample_ratios: Optional[Dict[str, float]] = None,
                 batch_size: int = 1, num_workers: int = 0, seed: int = 0, *, shuffle: bool = True,
                 drop_last: bool = True, pin_memory: Optional[bool] = None, max_empty_batches: int = 100,
                 batch_processor: Optional[Callable] = None) -> None:
        if not datasets:
            raise ConfigError("no training dataset: the config's datasets section is empty")
        ratios = dict(sample_ratios or {})
        unknown = sorted(set(ratios) - set(datasets))
        if unknown:
            raise ConfigError(f"sample_ratios name unknown dataset(s) {unknown}; datasets: {sorted(datasets)}")
        self.names: List[str] = list(datasets)
        self.weights = [float(ratios.get(n, 1.0)) for n in self.names]
        bad = [n for n, w in zip(self.names, self.weights) if not w >= 0]
        if bad or sum(self.weights) <= 0:
            raise ConfigError(f"datasets.*.sample_ratio: must be >= 0 with a positive sum, got "
                              f"{dict(zip(self.names, self.weights))}")
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        self.seed = seed
        self.batch_size = batch_size
        self.max_empty_batches = max_empty_batches
        self._rng = random.Random(seed)
        self.streams = {
            n: _Stream(n, d, batch_size, num_workers, derive_seed(seed, k), shuffle, drop_last, pin_memory,
                       batch_processor)
            for k, (n, d) in enumerate(datasets.items())
        }
        self.stats: Dict[str, int] = {n: 0 for n in self.names}
        logger.info("mixing %s with ratios %s, batch size %d, %d worker(s) each", self.names, self.weights,
                    batch_size, num_workers)

    def __iter__(self) -> "MixedLoader":
        return self

    def __next__(self) -> Dict[str, Any]:
        name = self._rng.choices(self.names, weights=self.weights, k=1)[0]
        stream = self.streams[name]
        carried: List[Any] = []
        for _ in range(self.max_empty_batches):
            batch = stream.next()
            if not is_empty_batch(batch):
                batch["bad_samples"] = carried + list(batch.get("bad_samples", []))
                batch["dataset"] = name
                self.stats[name] += 1
                return batch
            carried.extend(batch.get("bad_samples", []))
        examples = ", ".join(f"{p} ({r})" for p, r in carried[:3])
        raise DataError(f"dataset {name}: {self.max_empty_batches} batches in a row had only bad samples "
                        f"(e.g. {examples}); check the data paths")

    def state_dict(self) -> Dict[str, Any]:
        """The data position: choice RNG, per-dataset epoch and batches consumed, stats."""
        return {"seed": self.seed, "rng": self._rng.getstate(), "stats": dict(self.stats),
                "streams": {n: s.state_dict() for n, s in self.streams.items()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if sorted(state["streams"]) != sorted(self.streams):
            raise DataError(f"data loader state holds datasets {sorted(state['streams'])} but this run has "
                            f"{sorted(self.streams)}; resume with the same datasets")
        if state.get("seed") != self.seed:
            logger.warning("resuming data position saved with seed %s under seed %s", state.get("seed"), self.seed)
        rng = state["rng"]
        self._rng.setstate((rng[0], tuple(rng[1]), rng[2]))
        for n, s in state["streams"].items():
            self.streams[n].load_state_dict(s)
        self.stats = {n: int(state["stats"].get(n, 0)) for n in self.names}


def build_train_loader(datasets: Dict[str, Dataset], sample_ratios: Optional[Dict[str, float]] = None,
                       batch_size: int = 1, num_workers: int = 0, seed: int = 0, **kwargs: Any) -> MixedLoader:
    """The training loader over ``datasets`` (each one's train split); see :class:`MixedLoader`."""
    return MixedLoader(datasets, sample_ratios, batch_size, num_workers, seed, **kwargs)
