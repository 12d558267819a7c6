"""Training-step throughput: samples/s and tokens/s per stage; on GPU also MFU and peak memory.

    python bench/train_step.py                 # CPU: tiny and mid-size models, stage 1 and stage 2
    python bench/train_step.py --gpu           # one GPU: full-size 7B, random weights, stage 1 and 2
    python bench/train_step.py --gpu --model-type vicuna13b --batch-size 8

Stage 1 is a caption batch (8 frames, ``max_txt_len`` 32); stage 2 an instruction batch
(8 frames, ``--seq-len`` tokens with the visual placeholders). Both train the video branch with
the frozen ViT, Q-Former and LLM, as the Video-LLaMA VL recipes do.

FLOP accounting (nanoGPT style: 2 FLOPs per multiply-accumulate, matmuls only, attention scores
counted in full even where causal masking skips them), per sample:

* frozen encoders, forward only: the ViT on every frame (``2 N_vit P + 4 L d P^2`` for ``P``
  tokens) and the image Q-Former (queries through its layers + cross-attention to ``P`` tokens);
* the LLM, frozen but back-propagated through (the video branch sits below it): forward
  ``2 N T + 4 L d T^2``; backward computes activation gradients only (no weight gradients), i.e.
  ``2 N T + 8 L d T^2``;
* the trainable video Q-Former and ``llama_proj``: forward + backward with weight gradients,
  ``6 N_train`` per processed token.

MFU = counted FLOPs per second / the GPU's dense bf16 peak (``--peak-tflops`` to override).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

# Dense bf16/fp16 tensor-core peaks (FLOP/s), by a substring of the device name.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L40": 181e12, "V100": 125e12}


@dataclass
class TransformerShape:
    """What the FLOP formulas need of one transformer stack."""

    params: int  # matmul parameters (embeddings excluded)
    layers: int
    width: int


def linear_params(module: torch.nn.Module) -> int:
    """Parameters of the Linear layers in ``module`` (what matmul FLOPs scale with)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def forward_flops(shape: TransformerShape, tokens: int, context: Optional[int] = None) -> float:
    """One forward pass over ``tokens`` tokens attending to ``context`` keys (self-attention: tokens)."""
    context = tokens if context is None else context
    return 2.0 * shape.params * tokens + 4.0 * shape.layers * shape.width * tokens * context


def frozen_backward_flops(shape: TransformerShape, tokens: int) -> float:
    """Backward through frozen weights: activation gradients only (2 N T) + attention (8 L d T^2)."""
    return 2.0 * shape.params * tokens + 8.0 * shape.layers * shape.width * tokens * tokens


def train_flops(params: int, tokens: int) -> float:
    """Forward + backward with weight gradients for a small trainable part: 6 N T."""
    return 6.0 * params * tokens


def sample_flops(
    vit: TransformerShape, vit_tokens: int, frames: int,
    qformer: TransformerShape, num_query: int,
    llm: TransformerShape, seq_len: int,
    trainable_params: int, video_tokens: int,
) -> Dict[str, float]:
    """FLOPs per training sample, split into the frozen encoders, the LLM and the trainable parts."""
    encoder = frames * (forward_flops(vit, vit_tokens) + forward_flops(qformer, num_query, vit_tokens))
    llm_fwd = forward_flops(llm, seq_len)
    llm_bwd = frozen_backward_flops(llm, seq_len)
    train = train_flops(trainable_params, video_tokens)
    return {"encoder_fwd": encoder, "llm_fwd": llm_fwd, "llm_bwd": llm_bwd, "trainable": train,
            "total": encoder + llm_fwd + llm_bwd + train}


def model_shapes(model: Any) -> Dict[str, TransformerShape]:
    vit = model.visual_encoder
    llm_cfg = model.llama_model.config
    llm_layers = model.llama_model.model.layers if hasattr(model.llama_model, "model") else model.llama_model
    return {
        "vit": TransformerShape(linear_params(vit), len(vit.blocks), vit.embed_dim),
        "qformer": TransformerShape(linear_params(model.Qformer), model.Qformer.config.num_hidden_layers,
                                    model.Qformer.config.hidden_size),
        "llm": TransformerShape(linear_params(llm_layers), llm_cfg.num_hidden_layers, llm_cfg.hidden_size),
    }


# ---------------------------------------------------------------------------------------------- models
MID_SIZE = {
    "vit": {"patch_size": 14, "embed_dim": 384, "depth": 6, "num_heads": 6, "mlp_hidden": 1536},
    "image_size": 112,
    "qformer": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024,
                "cross_attention_freq": 2},
    "llm_config": {"model_type": "llama", "hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8,
                   "num_key_value_heads": 8, "intermediate_size": 1376, "vocab_size": 512,
                   "max_position_embeddings": 1024, "rms_norm_eps": 1.0e-6, "pad_token_id": 0},
    "num_query_token": 32, "num_video_query_token": 32,
}


def build_model(kind: str, device: str, model_type: str = "vicuna7b") -> Any:
    from omegaconf import OmegaConf

    from videollm.config import build_model_config
    from videollm.models.video_llama import VideoLLAMA

    if kind == "full":
        user = {"arch": "video_llama", "model_type": model_type, "llama_model": "", "vit_ckpt": "",
                "q_former_model": "", "tokenizer": "tiny", "frozen_video_Qformer": False, "frozen_llama_proj": False}
    else:
        user = {"arch": "video_llama", "model_type": "tiny", "frozen_video_Qformer": False, "frozen_llama_proj": False}
        if kind == "mid":
            user.update(MID_SIZE)
    cfg = build_model_config(OmegaConf.create(user))
    if kind == "full":
        cfg.max_txt_len = 32
    with torch.device(device):
        model = VideoLLAMA.from_config(cfg)
    return model.to(device)


def make_batch(model: Any, stage: int, batch: int, frames: int, seq_len: int, device: str) -> Dict[str, Any]:
    size = model.cfg.image_size
    video = torch.randn(batch, 3, frames, size, size, device=device)
    if stage == 1:
        words = ["a", "red", "circle", "moving", "left", "on", "a", "dark", "background"] * 4
        return {"image": video, "text_input": [" ".join(words[: 6 + (i % 4)]) for i in range(batch)]}
    vocab = model.llama_model.config.vocab_size
    n_vis = model.num_video_query_token
    ids = torch.randint(3, min(vocab, 500), (batch, seq_len), device=device)
    ids[:, 5 : 5 + n_vis] = model.IMAGE_PATCH_TOKEN_ID
    labels = ids.clone()
    labels[:, : 5 + n_vis + 10] = -100
    return {"images": video, "input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
            "conv_type": "multi"}


def bench_stage(model: Any, stage: int, batch: int, frames: int, seq_len: int, steps: int, warmup: int,
                device: str, amp: Optional[torch.dtype]) -> Dict[str, float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    model.train()
    samples = make_batch(model, stage, batch, frames, seq_len, device)
    ctx = (lambda: torch.autocast(device.split(":")[0], dtype=amp)) if amp else (lambda: torch.autocast("cpu", enabled=False))
    seq = 0
    for i in range(warmup + steps):
        if i == warmup:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
        with ctx():
            out = model(samples)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        seq = int(out["seq_len"])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    res = {"samples_per_s": batch / dt, "tokens_per_s": batch * seq / dt, "seq_len": seq, "step_s": dt}
    if device.startswith("cuda"):
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def flops_for(model: Any, frames: int, seq_len: int) -> Dict[str, float]:
    shapes = model_shapes(model)
    vit_tokens = model.visual_encoder.patch_embed.num_patches + 1
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return sample_flops(shapes["vit"], vit_tokens, frames, shapes["qformer"], model.query_tokens.shape[1],
                        shapes["llm"], seq_len, trainable, frames * model.query_tokens.shape[1])


def print_table(rows: List[Dict[str, Any]], columns: List[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(columns, widths)))


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="full-size model on one CUDA GPU (random weights)")
    p.add_argument("--model-type", default="vicuna7b", help="full-size preset for --gpu")
    p.add_argument("--batch-size", type=int, default=None, help="per-device batch (default: 32 stage 1 / 4 stage 2 on GPU)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None, help="stage-2 sequence length (default 320 GPU, 96 CPU)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    p.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's dense bf16 peak")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: List[Dict[str, Any]] = []
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu: no CUDA device visible")
        device = "cuda"
        name = torch.cuda.get_device_name()
        peak = args.peak_tflops * 1e12 if args.peak_tflops else next((v for k, v in PEAK_FLOPS.items() if k in name), None)
        model = build_model("full", device, args.model_type)
        model.autocast_dtype = torch.bfloat16
        for stage in args.stages:
            batch = args.batch_size or (32 if stage == 1 else 4)
            seq = args.seq_len or 320
            r = bench_stage(model, stage, batch, args.frames, seq, args.steps or 10, args.warmup or 3, device,
                            torch.bfloat16)
            f = flops_for(model, args.frames, r["seq_len"])
            achieved = f["total"] * r["samples_per_s"]
            rows.append({"model": args.model_type, "stage": stage, "batch": batch, "seq": r["seq_len"],
                         "samples/s/GPU": r["samples_per_s"], "tokens/s": r["tokens_per_s"],
                         "TFLOP/sample": f["total"] / 1e12, "enc share": f["encoder_fwd"] / f["total"],
                         "TFLOP/s": achieved / 1e12, "MFU": achieved / peak if peak else None,
                         "peak GiB": r["peak_mem_gib"]})
        print(f"device: {name}; peak {peak / 1e12 if peak else '?'} TFLOP/s (bf16 dense)")
        print_table(rows, list(rows[0]))
        return rows
    for kind in ("tiny", "mid"):
        torch.manual_seed(0)
        model = build_model(kind, "cpu")
        for stage in args.stages:
            batch = args.batch_size or (8 if kind == "tiny" else 2)
            seq = args.seq_len or 96
            r = bench_stage(model, stage, batch, min(args.frames, 4 if kind == "tiny" else args.frames), seq,
                            args.steps or (10 if kind == "tiny" else 3), args.warmup or 1, "cpu", None)
            rows.append({"model": kind, "stage": stage, "batch": batch, "seq": r["seq_len"],
                         "samples/s": r["samples_per_s"], "tokens/s": r["tokens_per_s"], "step s": r["step_s"]})
    print(f"CPU, {torch.get_num_threads()} threads")
    print_table(rows, list(rows[0]))
    return rows


if __name__ == "__main__":
    main()
