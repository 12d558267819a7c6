"""Models; importing this package registers them."""

from videollm.models.video_llama import VideoLLAMA  # noqa: F401
from videollm.models.llmva_gebc import LLMVAGEBC  # noqa: F401
from videollm.models.video_llava import VideoLLaVA  # noqa: F401
from videollm.models.pllava import PLLaVA  # noqa: F401
from videollm.models.llama_vid import LLaMAVID  # noqa: F401
