"""Getting items onto the items stream: files, stdin, or the Python API."""

from producers.api import Producer, ProduceReport

__all__ = ["ProduceReport", "Producer"]
