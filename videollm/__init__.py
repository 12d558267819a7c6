"""videollm: training and serving video large language models (Video-LLaMA and relatives)."""

__version__ = "0.1.0"
