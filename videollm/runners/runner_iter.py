"""The iteration-based training runner (``run.runner: runner_iter``).

What one run does, top to bottom (:meth:`RunnerIter.train`)::

    for epoch in range(start_epoch, max_epoch):           # "epochs" of iters_per_epoch iterations
        for i in range(iters_per_epoch):
            batch = next(loader)                           # one dataset per batch, by sample_ratio
            lr = scheduler.step(epoch, i)                  # before the forward pass, every iteration
            loss = task.forward_step(model, batch)         # under autocast when run.amp
            backward(loss * its share of the window's tokens)
            every accum_grad_iters iterations: (unscale, clip,) optimizer step, zero grads
        checkpoint_{epoch}.pth + resume_latest.pth
    evaluate (run.evaluate) -> eval_results.json

Gradient accumulation is token-weighted. Hugging Face's loss is a mean over the supervised
tokens of a micro-batch, so averaging micro-batch losses would weight a token of a short batch
more than one of a long batch. Each micro-batch's loss is back-propagated with weight
``world_size * n_tokens(micro-batch, this rank) / N_ref`` and, before the optimizer step, the
gradients are multiplied by ``N_ref / N_window`` (``N_*`` summed over ranks; ``N_ref`` is the
first micro-batch's global count, which keeps gradient magnitudes normal for fp16). The result
is the gradient of the mean loss over every supervised token of the window on every rank:
exactly what one process with the whole global batch computes (up to float rounding), for any
token counts. The original Video-LLaMA summed un-scaled micro-batch losses instead (so its
``accum_grad_iters`` also multiplied the learning rate); its recipes use ``accum_grad_iters: 1``,
where both agree. Under DeepSpeed the engine does its own (per-micro-batch mean) accumulation.

A window whose loss is non-finite on any rank is skipped (no optimizer update, gradients
dropped, a warning); ``run.max_nonfinite_in_row`` such iterations in a row raise
:class:`~videollm.errors.TrainingError`. Bad samples reported by the collaters are counted per
epoch by :class:`~videollm.datasets.BadSampleTracker`; past ``run.max_bad_sample_fraction`` the
run stops with :class:`~videollm.errors.DataError`.

Checkpoints (rank 0, written atomically): ``checkpoint_{epoch}.pth`` (and
``checkpoint_iter_{n}.pth`` every ``run.save_freq_iters``) in the original's format
``{"model", "optimizer", "config", "scaler", "epoch"}``, loadable by the original and by
``model.ckpt`` here; and ``resume_latest.pth``, the full state for an exact resume (model,
optimizer, scheduler, scaler, every rank's RNG states, the data position, counters). Resuming
from it (``run.resume_ckpt_path`` or ``run.auto_resume``) reproduces the losses and weights of an
uninterrupted run exactly on CPU.

What a kill, a full disk or a changed config cannot break:

- Every file is written to a hidden temporary sibling and renamed into place when complete, so a
  kill or a full disk leaves the previous files intact; temporaries of killed runs are removed when
  the next run starts (logged). A storage failure stops the run with
  :class:`~videollm.errors.StorageError` naming the file and the cause.
- ``run.auto_resume`` takes ``resume_latest.pth``; if it is missing (a kill during its first write)
  or unreadable, the newest ``checkpoint_*.pth`` that loads (weights, optimizer, the position; not
  the data order or RNG streams, with a warning).
- Nothing is saved, and no old checkpoint pruned, while a streak of non-finite losses is in
  progress or a trained weight is inf/NaN (a warning; ``train_summary["skipped_saves"]``).
- A resume applies the CURRENT config's learning-rate schedule and optimizer settings (weight
  decay, betas) from the saved position on, and logs what changed (``run.init_lr: 0.001 ->
  0.0001``); with a changed ``run.iters_per_epoch`` it continues at the same global iteration.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import re
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from videollm import dist
from videollm.checkpoint import load_file, remove_stale_temporaries, save_atomic
from videollm.errors import CheckpointError, ConfigError, TrainingError
from videollm.registry import registry
from videollm.runners.lr_sched import build_lr_scheduler
from videollm.runners.metrics import MetricsWriter
from videollm.runners.optim import build_optimizer

logger = logging.getLogger(__name__)

RESUME_NAME = "resume_latest.pth"
RESUME_FORMAT = 1
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Bad samples are judged only once an epoch has seen this many samples.
BAD_SAMPLE_MIN_SEEN = 20


def move_to_device(obj: Any, device: torch.device) -> Any:
    """Tensors inside dicts/lists/tuples moved to ``device``; everything else as is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: move_to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and obj and any(isinstance(x, torch.Tensor) for x in obj):
        return type(obj)(move_to_device(x, device) for x in obj)
    return obj


def batch_size_of(batch: Dict[str, Any]) -> int:
    if "num_samples" in batch:
        return int(batch["num_samples"])
    for key in ("image", "images", "input_ids"):
        value = batch.get(key)
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    return 0


def rng_state() -> Dict[str, Any]:
    state = {
        "python": random.getstate(),
        # as a tensor: the resume file must load with torch.load(weights_only=True)
        "numpy": _numpy_state_plain(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state_plain() -> tuple:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))


def set_rng_state(state: Dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


BEST_NAME = "checkpoint_best.pth"


class LineProgress:
    """The progress bar's interface for logs that are files: one log line every ``every`` of the
    run (iterations, rate, ETA, the last loss and lr)."""

    def __init__(self, total: int, initial: int = 0, every: float = 0.05) -> None:
        self.total, self.n, self.step = total, initial, max(1, int(total * every))
        self.next = initial + self.step
        self.t0, self.n0 = time.perf_counter(), initial
        self.postfix: Dict[str, Any] = {}

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n >= self.next or self.n == self.total:
            self.next = self.n + self.step
            rate = (self.n - self.n0) / max(time.perf_counter() - self.t0, 1e-9)
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            extra = ", ".join(f"{k}={v}" for k, v in self.postfix.items())
            logger.info("train: %d/%d (%.0f%%), %.2f it/s, ETA %s%s", self.n, self.total, 100 * self.n / self.total,
                        rate, time.strftime("%H:%M:%S", time.gmtime(eta)) if eta != float("inf") else "?",
                        f", {extra}" if extra else "")

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        self.postfix = values

    def close(self) -> None:
        pass


def _saved_run(state: Dict[str, Any]) -> Dict[str, Any]:
    """The ``run`` section of the config stored in a checkpoint ({} if none)."""
    config = state.get("config")
    run = config.get("run") if isinstance(config, dict) else None
    return run if isinstance(run, dict) else {}


def _plain_config(cfg: Any) -> Dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg or {})


@registry.register_runner("runner_iter")
class RunnerIter:
    """Trains ``model`` on ``datasets`` for ``max_epoch`` x ``iters_per_epoch`` iterations.

    Args:
        cfg: the assembled config (``run`` completed with defaults by ``load_config``).
        task: a registered task (:class:`~videollm.tasks.BaseTask`).
        model: the model, on CPU, not wrapped.
        datasets: ``{name: {split: Dataset}}`` from ``task.build_datasets``.
        dist_info: from :func:`videollm.dist.init_distributed` (single CPU process if None).
        train_loader: an infinite batch iterator with ``state_dict``/``load_state_dict``; built
            from the train splits with :func:`videollm.datasets.build_train_loader` if None.
    """

    def __init__(
        self,
        cfg: DictConfig,
        task: Any,
        model: nn.Module,
        datasets: Optional[Dict[str, Dict[str, Any]]] = None,
        *,
        dist_info: Optional[dist.DistInfo] = None,
        train_loader: Optional[Iterator[Dict[str, Any]]] = None,
    ) -> None:
        self.cfg = cfg
        self.run = cfg.run
        self.task = task
        self.datasets = datasets or {}
        self.dist = dist_info or dist.DistInfo()
        self.device = self.dist.device
        self.output_dir = Path(str(self.run.output_dir))
        self.max_epoch = int(self.run.max_epoch)
        self.iters_per_epoch = int(self.run.iters_per_epoch)
        self.accum = int(self.run.get("accum_grad_iters", 1))
        if self.accum < 1 or self.iters_per_epoch < 1 or self.max_epoch < 1:
            raise ConfigError("run.accum_grad_iters, run.iters_per_epoch and run.max_epoch must be >= 1")
        self.log_freq = max(1, int(self.run.get("log_freq", 10)))
        self.grad_clip = self.run.get("grad_clip", None)
        self.max_nonfinite = int(self.run.get("max_nonfinite_in_row", 5))

        self.model = model.to(self.device)
        self._setup_precision()
        self.optimizer, self.param_report = build_optimizer(self.model, self.run)
        self.scheduler = build_lr_scheduler(self.run, self.optimizer)
        self.deepspeed = bool(self.run.get("deepspeed_config"))
        self.engine = None
        self.wrapped: nn.Module = self.model
        if self.deepspeed:
            self._setup_deepspeed()
        elif self.dist.distributed:
            self._setup_ddp()

        from videollm.feature_cache import check_feature_caches

        check_feature_caches(self.model, self.datasets, self.run)  # cached datasets: made by this model?
        self.train_loader = train_loader if train_loader is not None else self._build_loader()
        from videollm.datasets import BadSampleTracker

        self.bad_samples = BadSampleTracker(
            max_fraction=float(self.run.get("max_bad_sample_fraction", 0.1)), min_samples=BAD_SAMPLE_MIN_SEEN
        )
        self.metrics = MetricsWriter(self.output_dir, enabled=self.dist.is_main,
                                     tensorboard=bool(self.run.get("tensorboard", False)),
                                     report_to=list(self.run.get("report_to") or []),
                                     config=_plain_config(cfg) if self.dist.is_main else None,
                                     wandb_project=str(self.run.get("wandb_project", "videollm")),
                                     plot_curves=bool(self.run.get("plot_curves", True)))
        # position: the next iteration to run
        self.start_epoch = 0
        self.start_iter = 0
        self.nonfinite_in_row = 0
        self.skipped_steps = 0
        self.optimizer_steps = 0
        self.skipped_saves = 0
        self.losses: List[Optional[float]] = []  # this process's per-iteration (global) losses

    # ------------------------------------------------------------------ set-up
    def _setup_precision(self) -> None:
        amp = bool(self.run.get("amp", False))
        name = str(self.run.get("amp_dtype", "bf16"))
        if name not in AMP_DTYPES:
            raise ConfigError(f"run.amp_dtype: {name!r} unknown; use fp16 or bf16")
        self.amp_dtype: Optional[torch.dtype] = None
        self.scaler = None
        if amp and self.device.type == "cuda":
            self.amp_dtype = AMP_DTYPES[name]
            self.model.set_autocast_dtype(self.amp_dtype)  # the model's own autocast follows the run
            if self.amp_dtype == torch.float16:
                self.scaler = torch.amp.GradScaler("cuda")
        elif amp and name == "bf16":
            self.amp_dtype = torch.bfloat16
        elif amp:
            logger.warning("run.amp with fp16 needs CUDA; this CPU run trains in fp32 (use amp_dtype=bf16 for CPU autocast)")

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _setup_ddp(self) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Parameters that take no part in a step (e.g. both branches trainable but only one
        # used per batch) need find_unused_parameters; it costs a graph walk per step.
        find_unused = bool(self.model.ddp_find_unused_parameters)
        self.wrapped = DDP(
            self.model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=find_unused,
        )

    def _setup_deepspeed(self) -> None:
        import json

        try:
            import deepspeed
        except ImportError as exc:
            raise ConfigError(f"run.deepspeed_config is set but deepspeed cannot be imported ({exc}); "
                              "pip install deepspeed") from exc
        path = Path(str(self.run.deepspeed_config))
        if not path.is_file():
            raise ConfigError(f"run.deepspeed_config: {path} not found")
        ds_cfg = json.loads(path.read_text())
        # The run's settings win over the JSON's, so that the YAML stays the one source of truth.
        ds_cfg["train_micro_batch_size_per_gpu"] = int(self.run.batch_size_train)
        ds_cfg["gradient_accumulation_steps"] = self.accum
        ds_cfg.pop("train_batch_size", None)
        if self.grad_clip:
            ds_cfg["gradient_clipping"] = float(self.grad_clip)
        if self.amp_dtype == torch.float16:
            ds_cfg.setdefault("fp16", {"enabled": True})
            self.scaler = None
        elif self.amp_dtype == torch.bfloat16 and self.device.type == "cuda":
            ds_cfg.setdefault("bf16", {"enabled": True})
        ds_cfg.setdefault("zero_allow_untested_optimizer", True)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.model, optimizer=self.optimizer, config=ds_cfg,
            dist_init_required=not torch.distributed.is_initialized(),
        )
        self.scheduler.optimizer = self.optimizer
        self.wrapped = self.engine
        self.zero_stage = int(ds_cfg.get("zero_optimization", {}).get("stage", 0))
        logger.info("DeepSpeed engine ready (ZeRO stage %d)", self.zero_stage)

    def _build_loader(self) -> Iterator[Dict[str, Any]]:
        from videollm.datasets import build_train_loader

        splits = list(self.run.get("train_splits", ["train"]))
        train = {}
        for name, by_split in self.datasets.items():
            for split in splits:
                if split in by_split:
                    train[name if len(splits) == 1 else f"{name}/{split}"] = by_split[split]
        if not train:
            raise ConfigError(f"no dataset has a split named in run.train_splits {splits}")
        ratios = {}
        for name in train:
            ratio = getattr(train[name], "sample_ratio", None)
            if ratio is None and "datasets" in self.cfg and name in self.cfg.datasets:
                ratio = self.cfg.datasets[name].get("sample_ratio", 1)
            ratios[name] = float(ratio if ratio is not None else 1)
        for name, ds in train.items():  # model facts the original's dataset YAML repeats
            facts = getattr(ds, "model_facts", None)
            if facts:
                self.model.check_dataset(name.split("/")[0], facts)
        return build_train_loader(
            train, ratios, batch_size=int(self.run.batch_size_train), num_workers=int(self.run.num_workers),
            seed=int(self.run.seed),  # the same on every rank: all ranks draw the same dataset per step
            batch_processor=self.model.batch_processor(),
        )

    @property
    def trainable_params(self) -> List[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self, epoch: int, model_state: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, Any]:
        """The original's checkpoint layout (what ``model.ckpt`` and the original load)."""
        return {
            "model": model_state if model_state is not None else self._cpu_model_state(),
            "optimizer": self._optimizer_state(),
            "config": _plain_config(self.cfg),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": epoch,
        }

    def _cpu_model_state(self) -> Dict[str, torch.Tensor]:
        """Trainable parameters + buffers (every weight with ``run.save_frozen_weights``) on CPU; a
        collective under ZeRO-3 (call on every rank)."""
        return {k: v.detach().cpu() for k, v in self._model_state().items()}

    def _model_state(self) -> Dict[str, torch.Tensor]:
        full = bool(self.run.get("save_frozen_weights", False))

        def pick() -> Dict[str, torch.Tensor]:
            return self.model.state_dict() if full else self.model.trainable_state_dict()

        if self.engine is not None and getattr(self, "zero_stage", 0) == 3:
            import deepspeed

            params = [p for p in self.model.parameters() if full or p.requires_grad]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                return {k: v.clone() for k, v in pick().items()}
        return pick()

    def _optimizer_state(self) -> Optional[Dict[str, Any]]:
        if self.engine is not None:
            return None  # ZeRO partitions it; the engine saves it in output_dir/deepspeed/
        return self.optimizer.state_dict()

    def resume_state(self, epoch: int, next_iter: int,
                     model_state: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, Any]:
        """Everything an exact resume needs; ``(epoch, next_iter)`` is the next iteration to run.
        A collective (RNG states are gathered from every rank): call it on every rank."""
        return {
            "format": RESUME_FORMAT,
            "model": model_state if model_state is not None else self._cpu_model_state(),
            "optimizer": self._optimizer_state(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": dist.all_gather_object(rng_state()),  # one entry per rank
            "data": self.train_loader.state_dict() if hasattr(self.train_loader, "state_dict") else None,
            "bad_samples": self.bad_samples.state_dict(),
            "epoch": epoch,
            "iteration": next_iter,
            "global_iteration": epoch * self.iters_per_epoch + next_iter,
            "nonfinite_in_row": self.nonfinite_in_row,
            "skipped_steps": self.skipped_steps,
            "optimizer_steps": self.optimizer_steps,
            "world_size": self.dist.world_size,
            "config": _plain_config(self.cfg),
        }

    def save(self, epoch: int, next_iter: int, name: Optional[str]) -> bool:
        """Write the resume state and, if ``name``, a checkpoint in the original's format.

        Nothing is written (and no old checkpoint pruned) in a non-finite state: during a streak
        of non-finite losses, or when a trained weight is inf/NaN. Every rank takes the same
        decision (the streak is counted from all-reduced losses, the weights are replicated or
        gathered). Returns whether the files were written."""
        model_state = self._cpu_model_state()  # collective under ZeRO-3
        problem = self._nonfinite_state(model_state)
        if problem:
            logger.warning("epoch %d iteration %d: %s; %s NOT saved, the previous checkpoints in %s are kept",
                           epoch, next_iter, problem, name or RESUME_NAME, self.output_dir)
            self.skipped_saves += 1
            return False
        if self.engine is not None:
            self.engine.save_checkpoint(str(self.output_dir / "deepspeed"), tag="resume")
        resume = self.resume_state(epoch, next_iter, model_state)  # collective (RNG gather)
        if self.dist.is_main:
            if name is not None:
                save_atomic(self.checkpoint_state(epoch, model_state), self.output_dir / name)
                logger.info("saved %s", self.output_dir / name)
                self._prune_checkpoints()
            save_atomic(resume, self.output_dir / RESUME_NAME)
        dist.barrier()
        return True

    def _nonfinite_state(self, model_state: Dict[str, torch.Tensor]) -> Optional[str]:
        """Why the current state must not be saved, or None when it is sound."""
        if self.nonfinite_in_row > 0:
            return f"{self.nonfinite_in_row} non-finite loss(es) in a row so far"
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        bad = [k for k, v in model_state.items()
               if k in trainable and v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            return f"non-finite values in {len(bad)} trained weight(s) (first: {bad[0]})"
        return None

    def _prune_checkpoints(self) -> None:
        keep = int(self.run.get("keep_last_checkpoints", 2))
        if keep <= 0:
            return
        files = [p for p in self.output_dir.glob("checkpoint_*.pth") if p.name != BEST_NAME]
        files.sort(key=lambda p: p.stat().st_mtime_ns)
        for old in files[:-keep]:
            old.unlink(missing_ok=True)
            logger.info("removed old checkpoint %s (run.keep_last_checkpoints=%d)", old, keep)

    def find_resume_path(self) -> Optional[Path]:
        """``run.resume_ckpt_path``; or with ``run.auto_resume`` the newest complete state in
        ``output_dir``: ``resume_latest.pth``, else (absent, e.g. killed during its first write, or
        unreadable) the newest ``checkpoint_*.pth`` that loads; None to start fresh.

        The files are read here to verify them; :meth:`load_resume` reuses what was read."""
        self._verified = None
        explicit = self.run.get("resume_ckpt_path", None)
        if explicit:
            return Path(str(explicit))
        if not self.run.get("auto_resume", False):
            return None
        latest = self.output_dir / RESUME_NAME
        candidates = ([latest] if latest.is_file() else []) + self._checkpoint_files()
        for path in candidates:
            try:
                state = load_file(path)
                if "model" not in state:
                    raise CheckpointError(f"{path}: no 'model' entry")
            except CheckpointError as exc:
                logger.warning("run.auto_resume: skipping %s: %s", path, exc)
                continue
            if path != latest:
                logger.warning("run.auto_resume: %s %s; resuming from %s instead (weights, optimizer and the "
                               "epoch; the data order and RNG streams start afresh, so the run is not "
                               "bit-identical to an uninterrupted one)", latest,
                               "is unreadable" if latest.is_file() else "is missing", path)
            self._verified = (path, state)
            return path
        logger.info("run.auto_resume: no complete checkpoint in %s; starting fresh", self.output_dir)
        return None

    def _checkpoint_files(self) -> List[Path]:
        """``checkpoint_{epoch}.pth`` and ``checkpoint_iter_{n}.pth`` of ``output_dir``, newest
        training position first (end of epoch e = global iteration (e + 1) * iters_per_epoch)."""
        found = []
        for path in self.output_dir.glob("checkpoint_*.pth"):
            m = re.fullmatch(r"checkpoint_(iter_)?(\d+)\.pth", path.name)
            if m:
                n = int(m.group(2))
                found.append((n if m.group(1) else (n + 1) * self.iters_per_epoch, path.stat().st_mtime_ns, path))
        return [p for *_, p in sorted(found, key=lambda t: t[:2], reverse=True)]

    def load_resume(self, path: Path) -> None:
        """Restore a ``resume_latest.pth`` (full) or an original-format checkpoint (weights,
        optimizer, scaler; training restarts at the next epoch, as the original's resume)."""
        verified = getattr(self, "_verified", None)
        state = verified[1] if verified is not None and verified[0] == path else load_file(path)
        self._verified = None
        if "model" not in state:
            raise CheckpointError(f"{path}: no 'model' entry; not a training checkpoint")
        missing = self._load_model(state["model"], path)
        if missing:
            raise CheckpointError(f"{path}: lacks trainable parameter(s) {missing[:5]}; is it from this model/stage?")
        if state.get("optimizer") is not None and self.engine is None:
            self._load_optimizer(state["optimizer"], path)
        if self.engine is not None:
            ds_dir = path.parent / "deepspeed"
            if ds_dir.is_dir():
                self.engine.load_checkpoint(str(ds_dir), tag="resume", load_module_strict=False)
        if state.get("scaler") is not None and self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        if state.get("format") == RESUME_FORMAT:
            self.scheduler.load_state_dict(state["scheduler"])  # keeps the new config's schedule, logs changes
            rngs = state["rng"]
            if len(rngs) != self.dist.world_size:
                logger.warning("%s was saved by %d process(es), this run has %d: RNG streams differ, "
                               "so the continuation is not bit-identical", path, len(rngs), self.dist.world_size)
            set_rng_state(rngs[self.dist.rank % len(rngs)])
            if state.get("data") is not None and hasattr(self.train_loader, "load_state_dict"):
                self.train_loader.load_state_dict(state["data"])
            self.bad_samples.load_state_dict(state["bad_samples"])
            self.start_epoch, self.start_iter = int(state["epoch"]), int(state["iteration"])
            saved_ipe = _saved_run(state).get("iters_per_epoch")
            if saved_ipe is not None and int(saved_ipe) != self.iters_per_epoch and "global_iteration" in state:
                # keep the step counter: continue at the same global iteration in the new epoch size
                self.start_epoch, self.start_iter = divmod(int(state["global_iteration"]), self.iters_per_epoch)
            self.nonfinite_in_row = int(state.get("nonfinite_in_row", 0))
            self.skipped_steps = int(state.get("skipped_steps", 0))
            self.optimizer_steps = int(state.get("optimizer_steps", 0))
        else:
            self.start_epoch, self.start_iter = int(state.get("epoch", -1)) + 1, 0
            m = re.fullmatch(r"checkpoint_iter_(\d+)\.pth", path.name)
            if m:  # a mid-epoch checkpoint: its name says where (its "epoch" is the epoch it is in)
                self.start_epoch, self.start_iter = divmod(int(m.group(1)), self.iters_per_epoch)
        if self.start_iter >= self.iters_per_epoch:
            self.start_epoch, self.start_iter = self.start_epoch + 1, 0
        logger.info("resumed from %s at epoch %d, iteration %d", path, self.start_epoch, self.start_iter)

    def _load_optimizer(self, saved: Dict[str, Any], path: Path) -> None:
        """The optimizer's state (moments, step counts) from ``saved``; its settings (weight decay,
        betas, eps, ...) from the current config. ``load_state_dict`` alone would bring back the
        saved settings; differences are logged."""
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        try:
            self.optimizer.load_state_dict(saved)
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{path}: the optimizer state does not fit this model/stage ({exc})") from exc
        changes = []
        for i, (group, settings) in enumerate(zip(self.optimizer.param_groups, fresh)):
            for key, value in settings.items():
                if key != "lr" and key in group and group[key] != value:
                    changes.append(f"param group {i} {key}: {group[key]} -> {value}")
                group[key] = value
        if changes:
            logger.warning("resume: optimizer settings differ from %s's; the new ones apply (%s)", path.name,
                           "; ".join(changes))

    def _load_model(self, model_state: Dict[str, torch.Tensor], path: Path) -> List[str]:
        """The model's one checked load path (shapes, unknown keys); returns the missing trainable keys."""
        from videollm.models.base import WeightSource

        trainable = tuple(n for n, p in self.model.named_parameters() if p.requires_grad)
        missing, _ = self.model.load_weights(model_state, WeightSource(str(path), provides=trainable), strict=False)
        return [k for k in missing if k in set(trainable)]

    # ------------------------------------------------------------------ one iteration
    def _reduce(self, loss: torch.Tensor, num_tokens: int) -> tuple[float, float, bool]:
        """(sum over ranks of loss*tokens, sum of tokens, any rank non-finite) in one all-reduce."""
        value = float(loss.detach().float().item())
        finite = math.isfinite(value)
        vec = torch.tensor([value * num_tokens if finite else 0.0, float(num_tokens), 0.0 if finite else 1.0],
                           dtype=torch.float64, device=self.device if self.dist.backend == "nccl" else "cpu")
        if dist.is_dist():
            torch.distributed.all_reduce(vec)
        return vec[0].item(), vec[1].item(), vec[2].item() > 0

    def _optimizer_step(self, window_tokens: float, ref_tokens: float) -> Optional[float]:
        """Normalise the accumulated gradients, clip, step. Returns the grad norm if computed."""
        params = self.trainable_params
        factor = ref_tokens / window_tokens if window_tokens > 0 else 0.0
        if factor != 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(factor)
        grad_norm = None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, float(self.grad_clip)))
            if not math.isfinite(grad_norm) and self.scaler is None:
                logger.warning("non-finite gradient norm (%s); optimizer step skipped", grad_norm)
                self.skipped_steps += 1
                self.optimizer.zero_grad(set_to_none=True)
                return grad_norm
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1
        return grad_norm

    # ------------------------------------------------------------------ training
    def train(self) -> Dict[str, Any]:
        """Run (or resume) the training; returns a summary (also in ``train_summary``)."""
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.output_dir)  # half-written saves of a killed run
        dist.barrier()
        resume_path = self.find_resume_path()
        if resume_path is not None:
            self.load_resume(resume_path)
        global_start = self.start_epoch * self.iters_per_epoch + self.start_iter
        self.metrics.truncate_from(global_start)
        total = self.max_epoch * self.iters_per_epoch
        bar = None
        if self.dist.is_main and global_start < total:
            import sys

            if sys.stderr.isatty():
                from tqdm.auto import tqdm

                bar = tqdm(total=total, initial=global_start, desc="train", unit="it", dynamic_ncols=True)
            else:  # a log file: whole lines every 5 %, not carriage-return updates piling into one line
                bar = LineProgress(total=total, initial=global_start)
        start_time = time.perf_counter()
        self.wrapped.train()
        try:
            for epoch in range(self.start_epoch, self.max_epoch):
                first = self.start_iter if epoch == self.start_epoch else 0
                self._train_epoch(epoch, first, bar)
                self.save(epoch, self.iters_per_epoch, f"checkpoint_{epoch}.pth")
                if self.run.get("valid_every_epoch", False):
                    self.validate_epoch(epoch)
                if self.dist.is_main:
                    logger.info("bad samples, %s", self.bad_samples.summary())
                if epoch + 1 < self.max_epoch:
                    self.bad_samples.new_epoch()
        finally:
            if bar is not None:
                bar.close()
            self.metrics.close()
        summary = {
            "iterations": total,
            "optimizer_steps": self.optimizer_steps,
            "skipped_steps": self.skipped_steps,
            "skipped_saves": self.skipped_saves,
            "train_seconds": time.perf_counter() - start_time,
            "final_loss": next((l for l in reversed(self.losses) if l is not None), None),
            "bad_samples": self.bad_samples.report(),
        }
        logger.info("training done: %d iterations; bad samples over the run: %s", total, self.bad_samples.summary())
        if self.run.get("evaluate", False):
            summary["eval"] = self.evaluate()
        self.train_summary = summary
        return summary

    # ------------------------------------------------------------------ per-epoch validation
    def validate_epoch(self, epoch: int) -> Optional[Dict[str, Any]]:
        """The task's evaluation of ``run.valid_splits`` (default ``val``) after an epoch; with
        ``run.keep_best_by`` (a metric name, e.g. ``agg_metrics``) the best epoch's weights are
        kept as ``checkpoint_best.pth`` (never pruned). Results go to ``eval_epoch_N.json``; the
        best so far to ``best.json`` (read again on resume)."""
        import json

        from videollm.evaluation import write_results

        results: Dict[str, Any] = {}
        if self.dist.is_main:
            splits = list(self.run.get("valid_splits", []) or []) or ["val"]
            view = OmegaConf.merge(self.run, {"test_splits": [], "valid_splits": splits})
            self.model.eval()
            results = self.task.evaluate(self.model, self.datasets, view, self.device)
            self.model.train()
            if results:
                path = write_results(results, self.output_dir / f"eval_epoch_{epoch}")
                key = self.run.get("keep_best_by", None)
                if key:
                    values = [r["metrics"].get(key) for r in results.values() if isinstance(r.get("metrics"), dict)]
                    values = [float(v) for v in values if isinstance(v, (int, float))]
                    if not values:
                        logger.warning("run.keep_best_by %r: not among the metrics of epoch %d (%s)", key, epoch,
                                       sorted(next(iter(results.values())).get("metrics", {})))
                    else:
                        best_file = self.output_dir / "best.json"
                        best = json.loads(best_file.read_text()) if best_file.is_file() else None
                        if best is None or values[0] > best["value"]:
                            save_atomic(self.checkpoint_state(epoch), self.output_dir / BEST_NAME)
                            best_file.write_text(json.dumps({"epoch": epoch, "metric": key, "value": values[0]}) + "\n")
                            logger.info("epoch %d: %s %.4f, the best so far -> %s", epoch, key, values[0], BEST_NAME)
                        else:
                            logger.info("epoch %d: %s %.4f (best %.4f at epoch %d)", epoch, key, values[0],
                                        best["value"], best["epoch"])
                logger.info("validation after epoch %d -> %s", epoch, path)
        dist.barrier()
        return results

    def _train_epoch(self, epoch: int, first: int, bar: Any) -> None:
        window_tokens, ref_tokens, window_poisoned, in_window = 0.0, 0.0, False, 0
        t_log, wait_log, samples_log, tokens_log = time.perf_counter(), 0.0, 0, 0
        logger.info("epoch %d: iterations %d..%d", epoch, first, self.iters_per_epoch - 1)
        for i in range(first, self.iters_per_epoch):
            t0 = time.perf_counter()
            samples = next(self.train_loader)
            wait_log += time.perf_counter() - t0
            self.bad_samples.update({"num_samples": batch_size_of(samples),
                                     "bad_samples": samples.get("bad_samples", [])})
            samples = {k: v for k, v in samples.items() if k not in ("bad_samples", "num_samples", "dataset")}
            samples = move_to_device(samples, self.device)
            lr = self.scheduler.step(epoch, i)
            # the last micro-batch of an accumulation window (or of the epoch) steps the optimizer
            last_in_window = (i + 1) % self.accum == 0 or i + 1 == self.iters_per_epoch

            with self.autocast():
                out = self.task.forward_step(self.wrapped, samples)
            loss = out["loss"]
            n_tok = int(out.get("num_tokens", 1))
            loss_sum, tok_sum, nonfinite = self._reduce(loss, n_tok)
            global_loss = loss_sum / tok_sum if tok_sum > 0 and not nonfinite else float("nan")

            if nonfinite:
                self.nonfinite_in_row += 1
                window_poisoned = True
                logger.warning("epoch %d iteration %d: non-finite loss on at least one rank; no update for this "
                               "accumulation window (%d in a row, limit %d)", epoch, i, self.nonfinite_in_row,
                               self.max_nonfinite)
                if self.nonfinite_in_row >= self.max_nonfinite:
                    raise TrainingError(
                        f"{self.nonfinite_in_row} non-finite losses in a row (run.max_nonfinite_in_row="
                        f"{self.max_nonfinite}) at epoch {epoch} iteration {i}; lower run.init_lr, enable "
                        "run.grad_clip, use bf16 instead of fp16, or check the data"
                    )
            else:
                self.nonfinite_in_row = 0
            if not window_poisoned:
                if in_window == 0:
                    ref_tokens = tok_sum
                window_tokens += tok_sum
                weight = self.dist.world_size * n_tok / ref_tokens if ref_tokens > 0 else 0.0
                self._backward(loss * weight, sync=last_in_window)
                if self.engine is not None:
                    self.engine.step()  # DeepSpeed counts micro-steps and updates at its own boundary
            in_window += 1

            grad_norm = None
            if last_in_window:
                if window_poisoned:
                    self.skipped_steps += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.engine is not None:  # keep DeepSpeed's micro-step counter aligned
                        self.engine.zero_grad()
                elif self.engine is not None:
                    self.optimizer_steps += 1
                else:
                    grad_norm = self._optimizer_step(window_tokens, ref_tokens)
                window_tokens, ref_tokens, window_poisoned, in_window = 0.0, 0.0, False, 0

            self.losses.append(None if nonfinite else global_loss)
            batch = batch_size_of(samples)
            samples_log += batch * self.dist.world_size
            tokens_log += batch * int(out.get("seq_len", 0)) * self.dist.world_size
            global_iter = epoch * self.iters_per_epoch + i
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{global_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            if (i + 1) % self.log_freq == 0 or i + 1 == self.iters_per_epoch:
                now = time.perf_counter()
                elapsed = max(now - t_log, 1e-9)
                record = {
                    "iteration": global_iter, "epoch": epoch, "loss": global_loss, "lr": lr,
                    "samples_per_s": samples_log / elapsed, "tokens_per_s": tokens_log / elapsed,
                    "data_wait_fraction": min(1.0, wait_log / elapsed),
                    "num_tokens": int(tok_sum), "skipped_steps": self.skipped_steps,
                    "bad_samples": self.bad_samples.bad,
                }
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm
                self.metrics.write(record)
                t_log, wait_log, samples_log, tokens_log = now, 0.0, 0, 0
                self.bad_samples.check()
            save_every = int(self.run.get("save_freq_iters", 0))
            if save_every > 0 and (global_iter + 1) % save_every == 0 and in_window == 0 and i + 1 < self.iters_per_epoch:
                self.save(epoch, i + 1, f"checkpoint_iter_{global_iter + 1}.pth")
        self.bad_samples.check()

    def _backward(self, loss: torch.Tensor, sync: bool) -> None:
        if self.engine is not None:
            self.engine.backward(loss)
            return
        ctx = contextlib.nullcontext()
        if not sync and hasattr(self.wrapped, "no_sync"):
            ctx = self.wrapped.no_sync()
        with ctx:
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> Optional[Dict[str, Any]]:
        """The task's evaluation of the held-out splits (rank 0), written to eval_results.json."""
        from videollm.evaluation import write_results

        results: Dict[str, Any] = {}
        if self.dist.is_main:
            self.model.eval()
            results = self.task.evaluate(self.model, self.datasets, self.run, self.device)
            if results:
                path = write_results(results, self.output_dir)
                for key, res in results.items():
                    logger.info("eval %s: %s -> %s", key, res["metrics"], path)
            self.model.train()
        dist.barrier()
        return results

