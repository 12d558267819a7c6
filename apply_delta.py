"""Build Vicuna v0 weights from LLaMA and the Vicuna delta (or make such a delta), streamed.

    python apply_delta.py --base /path/llama-13b-hf --delta /path/vicuna-13b-delta-v0 \\
        --target /path/vicuna-13b-v0
    python apply_delta.py --make-delta --base BASE --target TARGET --delta OUT_DELTA

Accepts the original Video-LLaMA spellings --base-model-path / --target-model-path / --delta-path.
Memory use stays around one shard of each input instead of two full models; see
``videollm/delta.py`` for the exact semantics.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from videollm.checkpoint import is_storage_error, storage_error
from videollm.delta import DEFAULT_MAX_SHARD_SIZE, apply_delta, make_delta, parse_size
from videollm.errors import VideoLLMError

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", "--base-model-path", dest="base", required=True, help="base model folder (LLaMA, HF format)")
    parser.add_argument("--target", "--target-model-path", dest="target", required=True,
                        help="output folder (input with --make-delta)")
    parser.add_argument("--delta", "--delta-path", dest="delta", required=True,
                        help="delta folder (output with --make-delta)")
    parser.add_argument("--make-delta", action="store_true", help="write target - base to --delta instead")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="output dtype (default: that of the delta, or of the target with --make-delta)")
    parser.add_argument("--max-shard-size", default=str(DEFAULT_MAX_SHARD_SIZE), help="output shard size, e.g. 5GB, 2GiB")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        max_shard_size = parse_size(args.max_shard_size)
    except ValueError as e:
        parser.error(str(e))
    fn = make_delta if args.make_delta else apply_delta
    try:
        result = fn(args.base, args.target, args.delta, dtype=DTYPES.get(args.dtype), max_shard_size=max_shard_size)
    except VideoLLMError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError) as e:  # storage failures outside the output folder's writes
        if not is_storage_error(e):
            raise
        print(f"StorageError: {storage_error(e, getattr(e, 'filename', None) or args.target, 'cannot read or write', atomic=False)}", file=sys.stderr)
        return 1
    print(f"Wrote {result.output}: {result.num_tensors} tensors, {result.total_bytes / 1e9:.2f} GB, "
          f"vocab {result.vocab_size}; files: {', '.join(result.files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
