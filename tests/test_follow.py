"""Continuous ingestion as help desks do it: ``produce --follow`` on a file that grows a few
tickets at a time and is rotated, ``produce -`` on a pipe that stays open, a producer killed
and started again on its checkpoint, exports with a byte order mark or a field over the csv
module's limit. Real valkey, real ``tribunal produce`` processes, real files and pipes,
real signals.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis import Redis
from test_cli import cli, finished, items_on_stream, on, started, wait_for  # noqa: F401

from common.keys import Keys
from common.settings import Settings
from producers.follow import IDLE, Checkpoint, Lines, Restart
from producers.readers import csv_records, jsonl_records

pytestmark = pytest.mark.slow  # real processes


def ticket(n: int, **extra: Any) -> bytes:
    return orjson.dumps({"task": "sentiment", "text": f"ticket {n}", **extra}) + b"\n"


def append(path: Path, *lines: bytes) -> None:
    with path.open("ab") as f:
        f.write(b"".join(lines))


def texts(redis: Redis, keys: Keys) -> list[str]:
    return [item["text"] for item in items_on_stream(redis, keys)]


def stop(proc: Any) -> str:
    os.killpg(proc.pid, signal.SIGTERM)
    return finished(proc, 30).decode(errors="replace")


# --- a trickle is stored at once --------------------------------------------------------


def test_a_followed_file_stores_each_ticket_while_the_next_is_not_written_yet(
    tmp_path: Path, settings: Settings, redis: Redis, keys: Keys
) -> None:
    """Was: 3 tickets appended to a followed file were not in Redis after 20 s (held for a
    chunk of 500). Each is now stored before the next one is written, one at a time."""
    path = tmp_path / "desk.jsonl"
    path.write_bytes(b"")
    proc = started(tmp_path, on(settings), "produce", str(path), "--follow")
    try:
        for n in range(3):
            append(path, ticket(n))
            wait_for(lambda n=n: len(texts(redis, keys)) == n + 1, 15, f"ticket {n} stored")
    finally:
        said = stop(proc)
    assert texts(redis, keys) == ["ticket 0", "ticket 1", "ticket 2"]
    assert proc.returncode == 128 + signal.SIGTERM
    assert "produced 3, skipped 0 invalid" in " ".join(said.split())


def test_a_pipe_left_open_stores_each_ticket_as_it_comes(
    tmp_path: Path, settings: Settings, redis: Redis, keys: Keys
) -> None:
    """``tail -f export | tribunal produce -``: the pipe never ends, tickets come one by one."""
    proc = started(tmp_path, on(settings), "produce", "-")
    for n in range(3):
        proc.stdin.write(ticket(n))
        proc.stdin.flush()
        wait_for(lambda n=n: len(texts(redis, keys)) == n + 1, 15, f"ticket {n} stored")
    proc.stdin.close()  # the writer is done: produce ends by itself
    said = finished(proc, 30).decode(errors="replace")
    assert proc.returncode == 0, said
    assert texts(redis, keys) == ["ticket 0", "ticket 1", "ticket 2"]


# --- rotation ---------------------------------------------------------------------------


def test_a_copytruncate_rotation_is_followed_from_the_start_of_the_file(
    tmp_path: Path, settings: Settings, redis: Redis, keys: Keys
) -> None:
    """Was: after the truncation the reader kept its old offset: 5 of 6 records lost and a
    bogus "invalid JSON" line. Now the truncated file is read from its start, and its lines
    are numbered from 1 again (the bad line below is named as line 2)."""
    path = tmp_path / "desk.jsonl"
    path.write_bytes(ticket(0) + ticket(1) + ticket(2))
    proc = started(tmp_path, on(settings), "produce", str(path), "--follow")
    try:
        wait_for(lambda: len(texts(redis, keys)) == 3, 15, "the first three stored")
        shutil.copyfile(path, tmp_path / "desk.jsonl.1")  # logrotate's copytruncate
        with path.open("r+b") as f:
            f.truncate(0)
        time.sleep(0.5)  # the reader sees the file shorter than where it was
        append(path, ticket(3), b"{not json\n", ticket(4))
        wait_for(lambda: len(texts(redis, keys)) == 5, 15, "the tickets after the truncation")
        append(path, ticket(5))
        wait_for(lambda: len(texts(redis, keys)) == 6, 15, "a ticket written later")
    finally:
        said = " ".join(stop(proc).split())
    assert texts(redis, keys) == [f"ticket {n}" for n in range(6)]
    assert "desk.jsonl was truncated or rewritten in place: reading it from its start" in said
    assert "desk.jsonl:2: invalid JSON" in said
    assert "produced 6, skipped 1 invalid" in said


def test_a_rename_rotation_reads_the_old_file_to_its_end_then_follows_the_new_one(
    tmp_path: Path, settings: Settings, redis: Redis, keys: Keys
) -> None:
    """logrotate's ``create``: the file is renamed away and a new one made at the path. Was:
    the open descriptor stayed on the old file and the new one was never read."""
    path = tmp_path / "desk.jsonl"
    path.write_bytes(ticket(0))
    proc = started(tmp_path, on(settings), "produce", str(path), "--follow")
    try:
        wait_for(lambda: len(texts(redis, keys)) == 1, 15, "the first ticket stored")
        old = path.rename(tmp_path / "desk.jsonl.1")
        append(old, ticket(1))  # the desk wrote once more before it reopened its file
        append(path, ticket(2), ticket(3))
        wait_for(lambda: len(texts(redis, keys)) == 4, 15, "the new file's tickets")
        append(path, ticket(4))
        wait_for(lambda: len(texts(redis, keys)) == 5, 15, "a ticket written later")
    finally:
        said = " ".join(stop(proc).split())
    assert texts(redis, keys) == [f"ticket {n}" for n in range(5)]
    assert (
        "desk.jsonl was rotated (renamed): following the new file: reading it from its start"
        in said
    )


def test_a_rotated_csv_starts_with_its_header_again_and_it_is_not_a_ticket(
    tmp_path: Path,
) -> None:
    rows = [b"text,id\n", b"first,1\n", Restart(0), b"text,id\n", b"second,2\n"]
    records = list(csv_records(iter(rows), "d.csv"))
    assert records == [
        ("d.csv:2", {"text": "first", "id": "1"}),
        ("d.csv:2", {"text": "second", "id": "2"}),
    ]
    # The new file's columns in another order: its header is read, not the old one reused.
    reordered = [b"text,id\n", b"first,1\n", Restart(0), b"id,text\n", b"2,second\n"]
    assert list(csv_records(iter(reordered), "d.csv"))[1] == (
        "d.csv:2",
        {"text": "second", "id": "2"},
    )
    # A logger rotated with copytruncate writes rows only: the old header goes on.
    rows_only = [b"text,id\n", b"first,1\n", Restart(0), b"third,3\n"]
    assert list(csv_records(iter(rows_only), "d.csv"))[1] == (
        "d.csv:1",
        {"text": "third", "id": "3"},
    )


# --- restart and resume -----------------------------------------------------------------


def test_a_producer_killed_and_started_again_on_its_checkpoint_reads_nothing_twice(
    tmp_path: Path, settings: Settings, redis: Redis, keys: Keys
) -> None:
    """Tickets without ids would be added twice if read twice: SIGKILL after three were
    stored, two written while it was down; the restarted producer stores those two only."""
    path, saved = tmp_path / "desk.jsonl", tmp_path / "desk.checkpoint"
    path.write_bytes(ticket(0) + ticket(1))
    args = ("produce", str(path), "--follow", "--checkpoint", str(saved))
    proc = started(tmp_path, on(settings), *args)
    wait_for(lambda: len(texts(redis, keys)) == 2, 15, "the first two stored")
    append(path, ticket(2))
    wait_for(lambda: len(texts(redis, keys)) == 3, 15, "the third stored")
    wait_for(lambda: saved.exists() and Checkpoint(saved).load().line == 3, 15, "checkpoint")
    os.killpg(proc.pid, signal.SIGKILL)
    finished(proc, 30)
    append(path, ticket(3), ticket(4))

    again = started(tmp_path, on(settings), *args)
    try:
        wait_for(lambda: len(texts(redis, keys)) == 5, 15, "the two written while it was down")
        time.sleep(0.5)  # time to add more, if it read anything twice
    finally:
        said = " ".join(stop(again).split())
    assert texts(redis, keys) == [f"ticket {n}" for n in range(5)]
    assert "resuming after line 3" in said
    assert "produced 2, skipped 0 invalid" in said


def test_a_checkpoint_of_another_file_reads_this_one_from_the_start(
    tmp_path: Path,
    settings: Settings,
    redis: Redis,
    keys: Keys,
    cli: Any,  # noqa: F811
) -> None:
    path, saved = tmp_path / "desk.jsonl", tmp_path / "desk.checkpoint"
    path.write_bytes(ticket(0) + ticket(1))
    first = cli("produce", str(path), "--checkpoint", str(saved))
    assert first.returncode == 0, first.stderr
    path.unlink()
    path.write_bytes(ticket(2) * 3)  # a new file at the same path (its inode may be reused)
    second = cli("produce", str(path), "--checkpoint", str(saved))
    # Which of the two reasons depends on whether the file system gave the new file the old
    # inode (then its first bytes differ) or another (then it is another file): either way
    # it is read from the start.
    said = " ".join(second.stderr.decode().split())
    assert (
        "desk.jsonl does not start as it did at the checkpoint: reading it from the start" in said
        or "desk.jsonl is not the file of the checkpoint (rotated or replaced while stopped, "
        "the old one not beside it): reading it from the start"
        in said
    ), said
    assert texts(redis, keys) == ["ticket 0", "ticket 1", "ticket 2", "ticket 2", "ticket 2"]
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"[1, 2]")
    refused = cli("produce", str(path), "--checkpoint", str(garbage))
    assert refused.returncode == 2
    assert refused.stderr.decode().count("\n") == 1, refused.stderr
    assert "is not a tribunal checkpoint" in refused.stderr.decode()
    assert cli("produce", "-", "--checkpoint", str(saved)).returncode == 2


# --- exports as desks write them ------------------------------------------------------


def test_a_jsonl_export_with_a_byte_order_mark_keeps_its_first_ticket(
    tmp_path: Path,
    cli: Any,  # noqa: F811
    redis: Redis,
    keys: Keys,
) -> None:
    path = tmp_path / "notepad.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + ticket(0) + ticket(1) + ticket(2))
    proc = cli("produce", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "produced 3, skipped 0 invalid" in proc.stderr.decode()
    assert texts(redis, keys) == ["ticket 0", "ticket 1", "ticket 2"]
    ((where, record),) = jsonl_records(iter([b"\xef\xbb\xbf" + ticket(9)]), "m")
    assert (where, record) == ("m:1", {"task": "sentiment", "text": "ticket 9"})


def long_log(lines: int) -> str:
    """A pasted log whose lines look like CSV rows of their own."""
    return "\n".join(f'{n},sentiment,ERROR at frame {n}: "see above"' for n in range(lines))


def quoted(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'  # RFC 4180: a quote inside is doubled


def test_a_csv_field_over_the_csv_module_limit_is_read_whole_and_invents_nothing(
    tmp_path: Path,
    cli: Any,  # noqa: F811
    redis: Redis,
    keys: Keys,
) -> None:
    """Was: the 133 KB field was reported, then read from its inside: 24 "invalid" lines and
    3 tickets that were never in the export. Now the row is read whole: too long for
    ``max_text_chars``, it is refused as one item; with the limit raised, it is stored."""
    log = long_log(4_000)
    assert len(log) > 131_072
    export = tmp_path / "desk.csv"

    def write(prefix: str) -> None:
        export.write_text(
            "id,task,text\n"
            f"{prefix}-1,sentiment,before the log\n"
            f"{prefix}-2,sentiment,{quoted(log)}\n"
            f"{prefix}-3,sentiment,after the log\n",
            encoding="utf-8",
        )

    write("T")
    proc = cli("produce", str(export))
    said = " ".join(proc.stderr.decode().split())
    assert [item["id"] for item in items_on_stream(redis, keys)] == ["T-1", "T-3"]
    assert f"desk.csv:3-{3 + 3_999}: text has {len(log)} characters, over the limit of 8000" in said
    assert "produced 2, skipped 1 invalid" in said

    write("A")
    proc = cli("produce", str(export), env={"TRIBUNAL_MAX_TEXT_CHARS": "200000"})
    assert proc.returncode == 0, proc.stderr
    items = items_on_stream(redis, keys)
    assert [item["id"] for item in items] == ["T-1", "T-3", "A-1", "A-2", "A-3"]
    assert items[3]["text"] == log


def test_a_csv_row_too_long_to_hold_is_skipped_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    from producers import readers

    monkeypatch.setattr(readers, "MAX_ROW_CHARS", 1_000)
    log = long_log(100)
    rows = [b"id,text\n", b"1,short\n", f"2,{quoted(log)}\n".encode(), b"3,after\n", b'4,"open\n']
    records = list(csv_records(iter(b"".join(rows).splitlines(keepends=True)), "d.csv"))
    assert [where for where, _ in records] == ["d.csv:2", "d.csv:3-102", "d.csv:103", "d.csv:104"]
    assert str(records[1][1]) == "CSV row of over 1,000 characters (lines 3-102 skipped)"
    assert records[2][1] == {"id": "3", "text": "after"}
    assert str(records[3][1]) == "malformed CSV row: unexpected end of data"


def test_lines_say_idle_when_a_pipe_has_nothing_ready(tmp_path: Path) -> None:
    read, write = os.pipe()
    os.write(write, b"one\ntw")
    with os.fdopen(read, "rb") as stream, os.fdopen(write, "wb") as writer:
        got = iter(Lines("-", poll_s=0.05, stream=stream))
        assert next(got) == b"one\n"
        assert next(got) is IDLE  # "tw" is not a line yet: nothing more is ready
        writer.write(b"o\n")
        writer.flush()
        assert next(x for x in got if x is not IDLE) == b"two\n"


def test_a_csv_row_cut_by_a_stop_is_not_checkpointed_past_and_is_stored_whole_after(
    tmp_path: Path, settings: Settings, redis: Redis, keys: Keys
) -> None:
    """A row with a quoted newline half written when the producer stops: nothing is made of
    its half, the checkpoint stays before it, and the restarted producer stores it whole."""
    path, saved = tmp_path / "desk.csv", tmp_path / "desk.checkpoint"
    path.write_bytes(b'id,task,text\n0,sentiment,before\n1,sentiment,"first line\n')
    args = ("produce", str(path), "--follow", "--checkpoint", str(saved))
    proc = started(tmp_path, on(settings), *args)
    wait_for(lambda: len(texts(redis, keys)) == 1, 15, "the complete row stored")
    said = " ".join(stop(proc).split())
    assert "skipped 0 invalid" in said, said
    append(path, b'second line"\n2,sentiment,after\n')
    again = started(tmp_path, on(settings), *args)
    try:
        wait_for(lambda: len(texts(redis, keys)) == 3, 15, "the rest")
    finally:
        stop(again)
    assert texts(redis, keys) == ["before", "first line\nsecond line", "after"]


def test_with_a_checkpoint_an_unfinished_last_line_waits_for_its_end(
    tmp_path: Path,
    cli: Any,  # noqa: F811
    redis: Redis,
    keys: Keys,
) -> None:
    """Without --follow a file's last line is read even without its newline, unless a
    checkpoint is kept: the file may still be being written, and "hello wor" is not a ticket."""
    path, saved = tmp_path / "desk.csv", tmp_path / "desk.checkpoint"
    path.write_bytes(b"id,task,text\n1,sentiment,hello wor")
    first = cli("produce", str(path), "--checkpoint", str(saved))
    assert first.returncode == 0 and "produced 0, skipped 0 invalid" in first.stderr.decode()
    append(path, b"ld\n2,sentiment,next\n")
    second = cli("produce", str(path), "--checkpoint", str(saved))
    assert second.returncode == 0, second.stderr
    assert texts(redis, keys) == ["hello world", "next"]


def test_a_file_rewritten_in_place_to_a_larger_size_is_read_from_its_start(
    tmp_path: Path, settings: Settings, redis: Redis, keys: Keys
) -> None:
    """An exporter that rewrites its file (`>`) with more than before, within one poll: the
    size alone would not show it; the first bytes, fingerprinted as read, do."""
    path = tmp_path / "desk.jsonl"
    path.write_bytes(ticket(0) + ticket(1))
    proc = started(tmp_path, on(settings), "produce", str(path), "--follow")
    try:
        wait_for(lambda: len(texts(redis, keys)) == 2, 15, "the first two stored")
        path.write_bytes(b"".join(ticket(n, note="rewritten, longer") for n in range(10, 16)))
        wait_for(lambda: len(texts(redis, keys)) == 8, 15, "the rewritten file's tickets")
        time.sleep(0.5)  # time to read anything twice
    finally:
        said = " ".join(stop(proc).split())
    assert texts(redis, keys) == ["ticket 0", "ticket 1", *(f"ticket {n}" for n in range(10, 16))]
    assert "invalid" not in said.replace("skipped 0 invalid", "")


def test_a_file_rotated_while_the_producer_was_stopped_is_finished_then_the_new_one_read(
    tmp_path: Path,
    cli: Any,  # noqa: F811
    redis: Redis,
    keys: Keys,
) -> None:
    """Stopped at line 3; the desk wrote two more lines, then logrotate renamed the file to
    desk.jsonl.1 and a new desk.jsonl got two lines. The checkpointed file is found beside
    the path by its inode: its last two lines are read, then the new file: nothing lost."""
    path, saved = tmp_path / "desk.jsonl", tmp_path / "desk.checkpoint"
    path.write_bytes(ticket(0) + ticket(1) + ticket(2))
    assert cli("produce", str(path), "--checkpoint", str(saved)).returncode == 0
    append(path, ticket(3), ticket(4))
    path.rename(tmp_path / "desk.jsonl.1")
    path.write_bytes(ticket(5) + ticket(6))
    again = cli("produce", str(path), "--checkpoint", str(saved))
    assert again.returncode == 0, again.stderr
    said = " ".join(again.stderr.decode().split())
    assert "was rotated while stopped: reading the rest of" in said and "desk.jsonl.1 first" in said
    assert texts(redis, keys) == [f"ticket {n}" for n in range(7)]


def test_a_quote_left_open_while_following_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    """A stray opening quote in a followed CSV holds every later row (CSV cannot tell where
    the field was meant to end): said once, when the input waits, naming its line."""
    rows = [
        b"id,text\n",
        b"1,fine\n",
        b'2,"stray open quote\n',
        b"3,held\n",
        IDLE,
        b"4,held\n",
        IDLE,
    ]
    records = list(csv_records(iter(rows), "u.csv"))
    assert [r[0] for r in records if isinstance(r, tuple)] == ["u.csv:2", "u.csv:3-5"]  # at EOF
    warned = [r.getMessage() for r in caplog.records if "still open" in r.getMessage()]
    assert warned == [
        "u.csv:3 opens a quoted field still open 2 lines on: "
        "the rows after it wait for its closing quote"
    ]


def test_produce_reads_a_help_desks_nested_json_by_dotted_paths_as_serve_does(
    cli: Any,  # noqa: F811
    redis: Redis,
    keys: Keys,
) -> None:
    """The same mapping options as `serve`: a dotted path reaches into nested JSON, the
    value is taken out of its object (not in metadata twice), a numeric id is its digits."""
    export = b'{"ticket": {"id": 4711, "description": "Export fails", "via": "web"}}\n'
    proc = cli(
        "produce", "-", "--task", "sentiment", "--text-col", "ticket.description",
        "--id-col", "ticket.id", input=export,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    [item] = items_on_stream(redis, keys)
    assert (item["id"], item["text"]) == ("4711", "Export fails")
    assert item["metadata"] == {"ticket": {"via": "web"}}
