"""tribunal: multi-model speculative decoding for classification, on Redis Streams."""

__version__ = "0.1.0"
