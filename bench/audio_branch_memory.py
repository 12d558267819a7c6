"""Memory to build Video-LLaMA's audio encoder: ImageBind with only the towers it uses.

The original builds all six ImageBind-Huge modalities (1,200,781,057 parameters, 4.8 GB in
fp32) to use two. We build the vision and audio towers only. This script counts parameters on
the meta device and measures the peak resident memory of really allocating the towers on the
CPU (in a fresh subprocess, so the figure is not polluted by this process).

    python bench/audio_branch_memory.py            # vision+audio towers, fp32, CPU
    python bench/audio_branch_memory.py --audio-only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

ORIGINAL_PARAMS = 1_200_781_057  # all six modalities (verified figure of the reference notes)

CHILD = r"""
import json, resource, sys, torch
from videollm.models.imagebind import ImageBindModel, imagebind_huge_config
mods = sys.argv[1].split(",")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad():
    model = ImageBindModel(imagebind_huge_config(mods))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
n = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
print(json.dumps({"params": n, "peak_kb": peak, "base_kb": base}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--audio-only", action="store_true", help="build the audio tower alone (inference-only use)")
    args = ap.parse_args()
    mods = "audio" if args.audio_only else "vision,audio"
    out = subprocess.run([sys.executable, "-c", CHILD, mods], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    gb = 1024**3
    rows = [
        ("original: all six modalities (computed, fp32)", ORIGINAL_PARAMS, ORIGINAL_PARAMS * 4 / gb, "-"),
        (f"videollm: {mods} (measured)", r["params"], r["params"] * 4 / gb, f"{(r['peak_kb'] - r['base_kb']) / 1024**2:.2f}"),
    ]
    print(f"{'configuration':<48} {'params':>14} {'fp32 weights GiB':>16} {'peak RSS added GiB':>18}")
    for name, n, w, peak in rows:
        print(f"{name:<48} {n:>14,} {w:>16.2f} {peak:>18}")
    print(f"saving: {(1 - r['params'] / ORIGINAL_PARAMS) * 100:.0f}% of the encoder's parameters")


if __name__ == "__main__":
    main()
