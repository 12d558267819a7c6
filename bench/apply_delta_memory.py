"""Peak memory of apply_delta (streamed) versus the original method (two full models in RAM).

Builds a random LLaMA-shaped base (vocab V) and delta (vocab V+1) as sharded checkpoints on disk,
runs each method in a fresh subprocess and reports its peak resident memory:

    .venv/bin/python bench/apply_delta_memory.py                        # ~374 M params, fp16
    .venv/bin/python bench/apply_delta_memory.py --format bin           # .bin input shards
    .venv/bin/python bench/apply_delta_memory.py --hidden 512 --layers 8 --intermediate 1376 \\
        --methods stream --json                                         # ~58 M params, for tests

Columns: peak RSS (VmHWM) of the child; "above baseline", the same minus the child's RSS after
its imports (python + torch [+ transformers]); peak anonymous memory (RssAnon, polled every 5 ms),
which excludes file pages of memory-mapped inputs that the kernel can drop under pressure.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from videollm.checkpoint import save_atomic, save_safetensors_atomic  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def llama_shapes(vocab: int, hidden: int, layers: int, intermediate: int) -> list[tuple[str, tuple[int, ...]]]:
    """State-dict names and shapes of ``LlamaForCausalLM`` (multi-head attention, untied head)."""
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + f"self_attn.{x}_proj.weight", (hidden, hidden)) for x in "qkvo"]
        shapes += [(p + "mlp.gate_proj.weight", (intermediate, hidden)), (p + "mlp.up_proj.weight", (intermediate, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, intermediate)),
                   (p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
    return shapes + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def build_model(folder: Path, *, vocab: int, hidden: int, layers: int, intermediate: int, heads: int,
                dtype: torch.dtype, shard_bytes: int, fmt: str, seed: int) -> int:
    """Write a random model folder (config + shards + index), one shard in memory at a time.
    Returns its size in bytes."""
    from transformers import LlamaConfig

    folder.mkdir(parents=True)
    LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate,
                num_attention_heads=heads, num_key_value_heads=heads, dtype=str(dtype).removeprefix("torch."),
                ).save_pretrained(folder)
    gen = torch.Generator().manual_seed(seed)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in llama_shapes(vocab, hidden, layers, intermediate):
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    ext, stem = (".safetensors", "model") if fmt == "safetensors" else (".bin", "pytorch_model")
    weight_map, total = {}, 0
    for i, entries in enumerate(shards):
        file_name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}{ext}"
        tensors = {n: (torch.randn(s, generator=gen) * 0.02).to(dtype) for n, s in entries}
        if fmt == "safetensors":
            save_safetensors_atomic(tensors, folder / file_name)
        else:
            save_atomic(tensors, folder / file_name)
        weight_map.update({n: file_name for n in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}{ext}.index.json").write_text(json.dumps(index, indent=2))
    return total


_CHILD = r"""
import json, sys, threading, time
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
method, base, target, delta = sys.argv[1:5]
import torch
if method == "stream":
    from videollm.delta import apply_delta
else:
    from transformers import LlamaForCausalLM
baseline = status("VmRSS")
peak_anon, stop = [status("RssAnon")], []
def poll():
    while not stop:
        peak_anon[0] = max(peak_anon[0], status("RssAnon"))
        time.sleep(0.005)
poller = threading.Thread(target=poll, daemon=True)
poller.start()
t0 = time.time()
if method == "stream":
    apply_delta(base, target, delta)
else:  # the original Video-LLaMA / FastChat v0 apply_delta.py, steps as in the reference
    b = LlamaForCausalLM.from_pretrained(base, dtype=torch.float16)
    d = LlamaForCausalLM.from_pretrained(delta, dtype=torch.float16)
    n_new = d.get_input_embeddings().weight.shape[0] - b.get_input_embeddings().weight.shape[0]
    b.resize_token_embeddings(b.get_input_embeddings().weight.shape[0] + n_new)
    with torch.no_grad():
        b.get_input_embeddings().weight[-n_new:] = 0
        b.get_output_embeddings().weight[-n_new:] = 0
        d_state = d.state_dict()
        for name, p in b.state_dict().items():
            p += d_state[name]
    b.save_pretrained(target)
seconds = time.time() - t0
stop.append(1)
poller.join()
print("RESULT " + json.dumps({"baseline": baseline, "peak": status("VmHWM"), "peak_anon": peak_anon[0], "seconds": seconds}))
"""


def measure(method: str, base: Path, target: Path, delta: Path) -> dict:
    """Run one method in a fresh python; returns byte counts and seconds."""
    done = subprocess.run([sys.executable, "-c", _CHILD, method, str(base), str(target), str(delta)],
                          capture_output=True, text=True, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{method} failed (rc {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    parser.add_argument("--format", choices=["safetensors", "bin"], default="safetensors", help="input shard format")
    parser.add_argument("--shard-mb", type=float, default=200, help="input shard size in MB")
    parser.add_argument("--methods", default="stream,original", help="comma list of stream, original")
    parser.add_argument("--workdir", default=None, help="where to build the models (default: a temp dir, removed)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="apply_delta_bench_"))
    dtype = DTYPES[args.dtype]
    try:
        kw = dict(hidden=args.hidden, layers=args.layers, intermediate=args.intermediate, heads=args.heads,
                  dtype=dtype, shard_bytes=int(args.shard_mb * 1e6), fmt=args.format)
        base_bytes = build_model(work / "base", vocab=args.vocab, seed=0, **kw)
        delta_bytes = build_model(work / "delta", vocab=args.vocab + 1, seed=1, **kw)
        results = {}
        for method in args.methods.split(","):
            results[method] = measure(method, work / "base", work / f"target_{method}", work / "delta")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    params = base_bytes // dtype.itemsize
    summary = {"params": params, "dtype": args.dtype, "format": args.format, "input_shard_bytes": int(args.shard_mb * 1e6),
               "base_bytes": base_bytes, "delta_bytes": delta_bytes, "results": results}
    if args.json:
        print(json.dumps(summary))
        return 0
    mb = 1e6
    print(f"model: {params / 1e6:.0f} M params, {args.dtype}, {args.format} input shards of {args.shard_mb:.0f} MB")
    print(f"one model: {base_bytes / mb:.0f} MB    base + delta: {(base_bytes + delta_bytes) / mb:.0f} MB")
    print(f"{'method':<10} {'peak RSS MB':>12} {'above baseline MB':>18} {'peak anon MB':>13} {'x one model':>12} {'seconds':>8}")
    for method, r in results.items():
        above = r["peak"] - r["baseline"]
        print(f"{method:<10} {r['peak'] / mb:>12.0f} {above / mb:>18.0f} {r['peak_anon'] / mb:>13.0f} "
              f"{above / base_bytes:>12.2f} {r['seconds']:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
