"""Train a model from a YAML config.

    python train.py --cfg-path train_configs/tiny_synthetic.yaml
    torchrun --nproc_per_node=8 train.py --cfg-path train_configs/visionbranch_stage1_pretrain.yaml \
        --options run.init_lr=5e-5

Steps: load and validate the config (``--options key=value`` overrides), join the process group
(torchrun's environment; NCCL on GPU, gloo on CPU), build the task, the datasets and the model
under ``run.seed`` (the same weights on every rank), re-seed with ``run.seed + rank``, save the effective config into ``run.output_dir``
(relative to the current directory) and hand over to the runner named by ``run.runner``.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import random
import sys

import numpy as np
import torch


def parse_args(argv=None) -> argparse.Namespace:
    from videollm.config import add_common_args

    parser = argparse.ArgumentParser(description="Train a videollm model from a config file.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(parser)
    return parser.parse_args(argv)


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def setup_seeds(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def run_output_dir(args: argparse.Namespace) -> str:
    """``run.output_dir`` of the config, for messages ("the output folder" if it cannot be read)."""
    try:
        from videollm.config import load_config

        return str(load_config(args.cfg_path, args.options).run.output_dir)
    except Exception:  # noqa: BLE001 - only used to word an error message
        return "the output folder"


def main(argv=None) -> dict:
    t_start = time.perf_counter()
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    setup_logging(rank)
    log = logging.getLogger("train")

    from videollm import dist
    from videollm.config import load_config, save_config
    from videollm.errors import StorageError, VideoLLMError
    from videollm.registry import import_all, registry
    from videollm.tasks import setup_task

    try:
        import_all()
        cfg = load_config(args.cfg_path, args.options)
        run = cfg.run
        if run.get("deepspeed_config") and run.device == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        info = dist.init_distributed(str(run.device), str(run.dist_url))
        # The same seed on every rank while building, so that randomly initialised weights (new
        # modules, tiny test models) agree across ranks; then seed + rank (the original's rule) for
        # training, so that dropout differs between ranks.
        setup_seeds(int(run.seed))
        task = setup_task(cfg)
        datasets = task.build_datasets(cfg)
        model = task.build_model(cfg)
        setup_seeds(int(run.seed) + info.rank)
        if info.is_main:
            path = save_config(cfg, run.output_dir)
            log.info("effective config saved to %s", path)
        runner_cls = registry.get_runner_class(str(run.get("runner", "runner_iter")))
        runner = runner_cls(cfg, task, model, datasets, dist_info=info)
        t_train = time.perf_counter()
        summary = runner.train()
        if info.is_main:
            log.info("done: %s", {k: v for k, v in summary.items() if k != "eval"})
            wall = time.perf_counter() - t_start
            log.info("wall time: %.0f s in all (set-up %.0f s, training %.0f s, evaluation %.0f s)", wall,
                     t_train - t_start, summary.get("train_seconds", 0.0),
                     max(0.0, time.perf_counter() - t_train - summary.get("train_seconds", 0.0)))
        return summary
    except VideoLLMError as exc:
        hint = ""
        if isinstance(exc, StorageError):
            hint = " (the checkpoints written before are intact: make room, then rerun with run.auto_resume=true)"
        log.error("%s: %s%s", type(exc).__name__, exc, hint)
        raise SystemExit(1) from None
    except (OSError, RuntimeError) as exc:
        # Checkpoints report full/read-only disks as StorageError themselves; this catches the
        # other writes (config.yaml, the metrics log, DeepSpeed's files).
        from videollm.checkpoint import is_storage_error, storage_error

        if not is_storage_error(exc):
            raise
        error = storage_error(exc, getattr(exc, "filename", None) or run_output_dir(args), "cannot read or write", atomic=False)
        log.error("StorageError: %s (the checkpoints written before are intact: make room, then rerun with "
                  "run.auto_resume=true)", error)
        raise SystemExit(1) from None
    finally:
        from videollm import dist as _dist

        _dist.cleanup()


if __name__ == "__main__":
    main()
