"""Getting items onto the items stream: files, stdin, or the Python API."""

from producers.api import Producer, ProduceReport

__all__ = ["ProduceReport", "Producer"]

DISTRIBUTION = "tribunal"  # checked by tribunal.foreign_packages: this is tribunal's ``producers``
