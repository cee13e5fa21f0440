"""What a GGUF file's metadata says about serving it fast on a CPU.

Two facts decide a server's flags and a fetch's conversion (measured on 2 Zen 3 cores,
2026-12-06, shared/FACTS.md):

- **Sliding-window attention** (``{arch}.attention.sliding_window``: Gemma-2/3 …): by
  default llama-server keeps only the window of such layers, so it cannot reuse a cached
  prefix and evaluates the whole few-shot prompt on every request (``cache_n = 0``).
  ``--swa-full`` keeps the full cache: Gemma-3-270M went from 1,464 to 358 ms a ticket.
- **The weights' type** (``general.file_type``, llama.cpp's ``llama_ftype``): Q4_1 has no
  repacked or tinyBLAS kernel on x86, so SmolLM2-135M's prompt processing ran at 239
  tokens/s where the same weights as F16 ran at 585 (llama-bench pp512, 2 threads).

The header is read here, not with llama.cpp's ``gguf`` package: its ``GGUFReader`` builds
a numpy view of every element of every array, the tokenizer's vocabulary included, and
took 7-11 s per file on these machines, at every server start; reading the key-value
section and skipping the arrays takes a fraction of a second. The format is GGUF v2/v3
as ggml's docs/gguf.md specifies it (little-endian); the type and file-type numbers are
the ``gguf`` package's (``GGUFValueType``, ``LlamaFileType``).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from gguf import GGUFValueType, LlamaFileType

from common.errors import ConfigurationError

# Types with no fast CPU path here, converted on fetch (tribunal.serving.models). Only
# Q4_1 was measured; Q5_0 and Q5_1 lack the same repacked kernels and are not listed
# until measured.
SLOW_FILE_TYPES = frozenset({LlamaFileType.MOSTLY_Q4_1})
# What they become: F16 holds every Q4_1 weight (a 4-bit step times an f16 scale plus an
# f16 minimum) to f16 precision, so answers stay those of the original; it was also the
# fastest type measured (585 tokens/s; Q8_0 490).
FAST_FILE_TYPE = LlamaFileType.MOSTLY_F16


def type_name(file_type: LlamaFileType | None) -> str:
    """A weights type as llama.cpp's tools spell it ("Q4_1", "F16"; "unknown" for None)."""
    return "unknown" if file_type is None else file_type.name.removeprefix("MOSTLY_")


class UnreadableModel(ConfigurationError, ValueError):
    """The file is not a GGUF file this version of ``gguf`` can read."""


@dataclass(frozen=True)
class GGUFInfo:
    """``architecture`` (``general.architecture``, e.g. "gemma3"), ``file_type`` (the
    ``llama_ftype`` of its weights, None where the file does not say) and
    ``sliding_window`` (tokens, None for full attention)."""

    architecture: str
    file_type: LlamaFileType | None
    sliding_window: int | None

    @property
    def slow_weights(self) -> bool:
        return self.file_type in SLOW_FILE_TYPES

    @property
    def type_name(self) -> str:
        return type_name(self.file_type)


# Fixed-size scalar types: struct format (little-endian).
_SCALARS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_MAGIC = b"GGUF"


class _Header:
    """A cursor over the key-value section of a GGUF file (memory-mapped)."""

    def __init__(self, data: mmap.mmap) -> None:
        self.data, self.at = data, 0

    def take(self, fmt: str) -> int | float | bool:
        (value,) = struct.unpack_from(fmt, self.data, self.at)
        self.at += struct.calcsize(fmt)
        return value  # type: ignore[no-any-return]

    def skip(self, n: int) -> int:
        """Move ``n`` bytes on; returns where they start. A corrupt length that would leave
        the file raises ValueError (before anything is copied or the cursor overflows)."""
        if n > len(self.data) - self.at:
            raise ValueError(f"a length of {n} bytes at offset {self.at} runs past the end")
        self.at += n
        return self.at - n

    def string(self) -> str:
        n = int(self.take("<Q"))
        start = self.skip(n)
        return self.data[start : self.at].decode("utf-8", errors="replace")

    def value(self, kind: int, nested: bool = False) -> int | float | bool | str | None:
        """The value of type ``kind``; arrays are skipped (None): no key read here is one.
        An array of arrays is skipped one level deep (GGUF has none deeper)."""
        if kind == GGUFValueType.STRING:
            return self.string()
        if kind == GGUFValueType.ARRAY:
            item, count = int(self.take("<I")), int(self.take("<Q"))
            if item in _SCALARS:
                self.skip(count * struct.calcsize(_SCALARS[GGUFValueType(item)]))
            elif item == GGUFValueType.ARRAY and nested:
                raise ValueError("arrays nested more than two deep")
            else:
                for _ in range(count):
                    self.value(item, nested=True)
            return None
        return self.take(_SCALARS[GGUFValueType(kind)])

    def fields(self) -> dict[str, int | float | bool | str | None]:
        if self.data[:4] != _MAGIC:
            raise ValueError("no GGUF magic")
        self.at = 4
        version = self.take("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version}")
        self.take("<Q")  # tensors
        out = {}
        for _ in range(int(self.take("<Q"))):
            key = self.string()
            out[key] = self.value(int(self.take("<I")))
        return out


@lru_cache(maxsize=32)
def _read(path: Path, size: int, mtime_ns: int) -> GGUFInfo:
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            fields = _Header(data).fields()
        arch = str(fields.get("general.architecture") or "unknown")
        file_type = fields.get("general.file_type")
        raw_window = fields.get(f"{arch}.attention.sliding_window")
        window = int(raw_window) if raw_window else None
    except (ValueError, TypeError, OSError, struct.error, KeyError, OverflowError) as exc:
        raise UnreadableModel(f"{path}: not a readable GGUF file ({exc})") from None
    try:
        ftype = None if file_type is None else LlamaFileType(int(file_type))
    except ValueError:  # a type newer than this gguf package
        ftype = None
    return GGUFInfo(arch, ftype, window)


def gguf_info(path: Path) -> GGUFInfo:
    """The metadata of the GGUF file at ``path`` (cached per file version).
    Raises UnreadableModel."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise UnreadableModel(f"{path}: {exc.strerror}") from None
    return _read(path, stat.st_size, stat.st_mtime_ns)
