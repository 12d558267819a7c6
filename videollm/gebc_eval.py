"""Evaluate an LLMVA-GEBC config without training: ``python -m videollm.gebc_eval --cfg-path CFG``.

The ``boundary_captioning`` task's evaluation (captions of every held-out split, GEBC metrics,
result files and the submission pickle) on the model the config builds: ``model.ckpt`` names the
weights (a training checkpoint of this project or a released GEBC one); empty evaluates the
untrained model (the "before" numbers of the tiny recipe).
"""

from __future__ import annotations

import logging
from typing import Any

import torch


def main(argv: Any = None) -> int:
    """``python -m videollm.gebc_eval --cfg-path CFG [--options k=v ...]``: build the
    config's model (``model.ckpt`` = the weights to evaluate; empty = untrained) and datasets, run
    the evaluation, write ``<run.output_dir>/eval_results.json`` and print the metrics."""
    import argparse

    from videollm.config import load_config
    from videollm.evaluation import write_results
    from videollm.registry import import_all
    from videollm.tasks.base_task import setup_task
    from videollm.errors import VideoLLMError

    p = argparse.ArgumentParser(prog="python -m videollm.gebc_eval")
    p.add_argument("--cfg-path", required=True)
    p.add_argument("--options", nargs="+", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import_all()
        cfg = load_config(args.cfg_path, args.options)
        torch.manual_seed(int(cfg.run.seed))
        task = setup_task(cfg)
        datasets = task.build_datasets(cfg)
        model = task.build_model(cfg)
        device = torch.device(str(cfg.run.device))
        model.place(device)
        results = task.evaluate(model, datasets, cfg.run, device)
    except VideoLLMError as exc:
        print(f"error: {type(exc).__name__}: {exc}")
        return 1
    path = write_results(results, str(cfg.run.output_dir))
    for key, res in results.items():
        shown = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in res["metrics"].items() if k != "spice"}
        print(f"{key}: {shown}")
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
