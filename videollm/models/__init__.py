"""Models; importing this package registers them."""

from videollm.models.video_llama import VideoLLAMA  # noqa: F401
