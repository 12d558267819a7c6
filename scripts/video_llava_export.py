"""Write the Video-LLaVA of a config (training checkpoint loaded, LoRA merged) as a transformers folder.

    python scripts/video_llava_export.py export --cfg-path eval_configs/video_llava_tiny.yaml --out output/video_llava_hf

The folder loads with ``transformers.VideoLlavaForConditionalGeneration.from_pretrained``.
"""

import sys

from videollm.models.video_llava import main

if __name__ == "__main__":
    sys.exit(main())
