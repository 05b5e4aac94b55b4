"""megagpt: GPT-3-family pretraining with tensor, pipeline and data parallelism."""

__version__ = "0.1.0"
