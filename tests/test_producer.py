"""The producer's Python API and its readers, against the real Redis of the conftest."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis import Redis

from common.keys import Keys
from common.settings import Settings
from common.validation import InvalidItem
from producers.api import Producer
from producers.follow import IDLE, Ended, Lines
from producers.mapping import CsvColumns, Reading, UnusableSource
from producers.readers import csv_records, jsonl_records

GOOD_A = {"id": "good-a", "task": "sentiment", "text": "Thanks, all fixed now."}
GOOD_B = {"id": "good-b", "task": "sentiment", "text": "Where is my invoice?"}


def stream_items(redis: Redis, keys: Keys) -> list[dict[str, Any]]:
    """Every item on the items stream, in order; each entry must hold exactly one field, d."""
    items = []
    for _entry_id, fields in redis.xrange(keys.items):
        assert list(fields) == [b"d"], fields
        items.append(orjson.loads(fields[b"d"]))
    return items


def group_lag(redis: Redis, stream: str, group: str) -> int:
    for info in redis.xinfo_groups(stream):
        if info["name"] in (group, group.encode()):
            assert info["lag"] is not None
            return int(info["lag"])
    raise AssertionError(f"no group {group} on {stream}")


# --- valid records ----------------------------------------------------------------------


def test_valid_records_are_added_with_one_json_field(
    redis: Redis, settings: Settings, keys: Keys
) -> None:
    before = time.time()
    records = [
        {"task": "sentiment", "text": "The app crashes every time I log in."},
        {"id": "kept-1", "task": "sentiment", "text": "Love the new dashboard", "gold": "positive"},
        {
            "task": "similar_ticket",
            "text": "Cannot log in",
            "text_b": "Login page spins forever",
            "metadata": {"channel": "email", "priority": 2},
        },
        {"id": None, "task": "sentiment", "text": "Refund please"},
    ]
    report = Producer(redis, settings).send(records)
    after = time.time()

    assert report.produced == 4
    assert report.invalid == []
    items = stream_items(redis, keys)
    assert [i["text"] for i in items] == [r["text"] for r in records]
    assert items[1]["id"] == "kept-1"
    assert items[1]["gold"] == "positive"
    assert items[2]["text_b"] == "Login page spins forever"
    assert items[2]["metadata"] == {"channel": "email", "priority": 2}
    assert items[2]["task"] == "similar_ticket"
    generated = [items[0]["id"], items[2]["id"], items[3]["id"]]
    assert all(isinstance(i, str) and i for i in generated)
    assert len({i["id"] for i in items}) == 4  # unique, and distinct from the kept id
    for item in items:
        assert before <= item["produced_at"] <= after


def test_generated_ids_are_unique_across_many_records(
    redis: Redis, settings: Settings, keys: Keys
) -> None:
    report = Producer(redis, settings).send(
        [{"task": "sentiment", "text": f"ticket {n}"} for n in range(200)]
    )
    assert report.produced == 200
    assert len({i["id"] for i in stream_items(redis, keys)}) == 200


def test_default_task_applies_only_to_records_without_a_task(
    redis: Redis, settings: Settings, keys: Keys
) -> None:
    producer = Producer(redis, settings, default_task="sentiment")
    report = producer.send(
        [
            {"text": "no task named"},
            {"task": "similar_ticket", "text": "a", "text_b": "b"},
        ]
    )
    assert (report.produced, report.invalid) == (2, [])
    assert [i["task"] for i in stream_items(redis, keys)] == ["sentiment", "similar_ticket"]


def test_without_default_task_a_record_without_task_is_invalid(
    redis: Redis, settings: Settings, keys: Keys
) -> None:
    report = Producer(redis, settings).send([{"text": "no task named"}, GOOD_A])
    assert report.produced == 1
    assert report.invalid == [("record 1", "missing field 'task'")]
    assert [i["id"] for i in stream_items(redis, keys)] == ["good-a"]


def test_waited_s_is_zero_when_there_is_no_backpressure(redis: Redis, settings: Settings) -> None:
    report = Producer(redis, settings, chunk_size=2).send(
        [{"task": "sentiment", "text": f"t{n}"} for n in range(5)]
    )
    assert report.produced == 5
    assert report.waited_s == 0.0


# --- per-record validation ---------------------------------------------------------------

BAD_RECORDS = {
    "missing text": ({"task": "sentiment"}, ["missing field 'text'"]),
    "empty text": ({"task": "sentiment", "text": ""}, ["text is empty"]),
    "whitespace text": ({"task": "sentiment", "text": " \t\n "}, ["text is empty"]),
    "text too long": (
        {"task": "sentiment", "text": "x" * 51},
        ["text has 51 characters", "limit of 50"],
    ),
    "text_b too long": (
        {"task": "similar_ticket", "text": "short", "text_b": "y" * 60},
        ["text_b has 60 characters", "limit of 50"],
    ),
    "text is an int": ({"task": "sentiment", "text": 42}, ["field 'text'", "string"]),
    "metadata is a string": (
        {"task": "sentiment", "text": "hi", "metadata": "channel=email"},
        ["field 'metadata'", "dictionary"],
    ),
    "unknown task": (
        {"task": "toxicity", "text": "hi"},
        ["unknown task 'toxicity'", "sentiment", "similar_ticket"],
    ),
    "pair task without text_b": (
        {"task": "similar_ticket", "text": "hi"},
        ["'similar_ticket'", "needs text_b"],
    ),
    "text_b on single-text task": (
        {"task": "sentiment", "text": "hi", "text_b": "there"},
        ["'sentiment'", "text_b is not allowed"],
    ),
    "metadata too large": (
        {"task": "sentiment", "text": "hi", "metadata": {"blob": "z" * 200}},
        ["metadata is", "bytes, over the limit of 100"],
    ),
    "gold not a label": (
        {"task": "sentiment", "text": "hi", "gold": "ecstatic"},
        ["gold label 'ecstatic'", "positive"],
    ),
    "id with a space": ({"id": "a b", "task": "sentiment", "text": "hi"}, ["field 'id'"]),
    "id with braces": ({"id": "x{0}y", "task": "sentiment", "text": "hi"}, ["field 'id'"]),
    "empty id": ({"id": "", "task": "sentiment", "text": "hi"}, ["field 'id'"]),
    "unknown field": (
        {"task": "sentiment", "text": "hi", "colour": "red"},
        ["unknown field 'colour'"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_record_is_reported_and_neighbours_still_go(make_settings: Any, case: str) -> None:
    s = make_settings(max_text_chars=50, max_metadata_bytes=100)
    bad, reason_parts = BAD_RECORDS[case]
    with Redis.from_url(s.redis_url) as redis:
        report = Producer(redis, s).send([GOOD_A, bad, GOOD_B])
        items = stream_items(redis, Keys(s.namespace))

    assert report.produced == 2
    assert len(report.invalid) == 1
    where, reason = report.invalid[0]
    assert where == "record 2"
    for part in reason_parts:
        assert part in reason, (part, reason)
    assert [i["id"] for i in items] == ["good-a", "good-b"]


def test_many_bad_records_are_each_reported_in_order(
    redis: Redis, make_settings: Any, keys: Keys
) -> None:
    s = make_settings(max_text_chars=50, max_metadata_bytes=100)
    bads = [bad for bad, _ in BAD_RECORDS.values()]
    records: list[dict[str, Any]] = []
    for n, bad in enumerate(bads):
        records += [bad, {"task": "sentiment", "text": f"good {n}"}]
    report = Producer(redis, s, chunk_size=3).send(records)

    assert report.produced == len(bads)
    assert [w for w, _ in report.invalid] == [f"record {2 * n + 1}" for n in range(len(bads))]
    assert all(reason for _, reason in report.invalid)
    assert [i["text"] for i in stream_items(redis, keys)] == [f"good {n}" for n in range(len(bads))]


@pytest.mark.parametrize(
    "bad",
    [
        {"task": "sentiment", "text": "hi", "metadata": {"tags": {"a", "b"}}},
        {"task": "sentiment", "text": "lone surrogate \ud800"},
    ],
    ids=["metadata-with-a-set", "text-with-lone-surrogate"],
)
def test_unencodable_record_is_reported_not_raised(
    redis: Redis, settings: Settings, keys: Keys, bad: dict[str, Any]
) -> None:
    report = Producer(redis, settings).send([GOOD_A, bad, GOOD_B])
    assert report.produced == 2
    assert [w for w, _ in report.invalid] == ["record 2"]
    assert [i["id"] for i in stream_items(redis, keys)] == ["good-a", "good-b"]


# --- readers ----------------------------------------------------------------------------


def test_jsonl_reader_reports_unparseable_lines_by_file_and_line(
    redis: Redis, settings: Settings, keys: Keys
) -> None:
    lines = [
        b'{"task": "sentiment", "text": "first"}\n',
        b'{"task": "sentiment", "text": \n',  # truncated JSON
        b"\n",
        b"   \t \n",
        b'\xff\xfe{"task": "sentiment", "text": "latin"}\n',  # not UTF-8
        b'["sentiment", "an array"]\n',
        b'{"task": "sentiment", "text": "last", "id": "t-6"}',  # no final newline
    ]
    records = list(jsonl_records(iter(lines), "tickets.jsonl"))
    assert [where for where, _ in records] == [
        "tickets.jsonl:1",
        "tickets.jsonl:2",
        "tickets.jsonl:5",
        "tickets.jsonl:6",
        "tickets.jsonl:7",
    ]
    assert isinstance(records[1][1], InvalidItem)

    report = Producer(redis, settings).send(records)
    assert report.produced == 2
    invalid = dict(report.invalid)
    assert list(invalid) == ["tickets.jsonl:2", "tickets.jsonl:5", "tickets.jsonl:6"]
    assert invalid["tickets.jsonl:2"].startswith("invalid JSON")
    assert "not valid UTF-8" in invalid["tickets.jsonl:5"]
    assert "byte 0" in invalid["tickets.jsonl:5"]
    assert invalid["tickets.jsonl:6"] == "expected a JSON object, got list"
    assert [i["text"] for i in stream_items(redis, keys)] == ["first", "last"]


def test_jsonl_reader_validation_errors_name_the_line(
    redis: Redis, settings: Settings, keys: Keys
) -> None:
    lines = [
        b'{"task": "sentiment", "text": "ok"}\n',
        b'{"task": "sentiment", "text": "ok", "id": "has space"}\n',
        b'{"task": "nope", "text": "ok"}\n',
    ]
    report = Producer(redis, settings).send(jsonl_records(iter(lines), "in.jsonl"))
    assert report.produced == 1
    assert [w for w, _ in report.invalid] == ["in.jsonl:2", "in.jsonl:3"]
    assert "unknown task 'nope'" in report.invalid[1][1]


def test_csv_reader_maps_custom_columns_and_keeps_the_rest_as_metadata(
    redis: Redis, settings: Settings, keys: Keys
) -> None:
    lines = [
        b"ticket,kind,body,other,label,channel,customer\n",
        b"T-1,sentiment,The refund never arrived,,negative,email,acme\n",
        b'T-2,similar_ticket,"Cannot log in, again",Login broken,,chat,globex\n',
        b",sentiment,Great support,,,phone,\n",
        b"T-4,sentiment,,,,email,acme\n",  # empty text
        b"T-5,sentiment,fine,,,web,acme,surplus\n",  # one cell too many
    ]
    columns = CsvColumns(text="body", text_b="other", id="ticket", task="kind", gold="label")
    records = list(csv_records(iter(lines), "t.csv", columns))
    assert [where for where, _ in records] == [
        "t.csv:2",
        "t.csv:3",
        "t.csv:4",
        "t.csv:5",
        "t.csv:6",
    ]

    report = Producer(redis, settings).send(records)
    assert report.produced == 3
    assert [w for w, _ in report.invalid] == ["t.csv:5", "t.csv:6"]
    assert report.invalid[0][1] == "text is empty"
    assert "more cells than the header" in report.invalid[1][1]

    items = stream_items(redis, keys)
    assert items[0]["id"] == "T-1"
    assert items[0]["task"] == "sentiment"
    assert items[0]["text"] == "The refund never arrived"
    assert items[0]["gold"] == "negative"
    assert items[0]["metadata"] == {"channel": "email", "customer": "acme"}
    assert items[0].get("text_b") is None  # an empty mapped cell is left out
    assert items[1]["text"] == "Cannot log in, again"
    assert items[1]["text_b"] == "Login broken"
    assert items[1]["metadata"] == {"channel": "chat", "customer": "globex"}
    assert items[2]["text"] == "Great support"
    assert items[2]["id"] not in ("", "T-1", "T-2")  # empty id cell: an id is generated
    assert items[2]["metadata"] == {"channel": "phone", "customer": ""}


def test_csv_reader_default_columns() -> None:
    lines = [b"id,text,source\n", b"a1,hello there,web\n"]
    records = list(csv_records(iter(lines), "d.csv", CsvColumns()))
    assert records == [
        ("d.csv:2", {"id": "a1", "text": "hello there", "metadata": {"source": "web"}})
    ]


def test_csv_reader_accepts_a_utf8_byte_order_mark() -> None:
    lines = [b"\xef\xbb\xbftext,channel\n", b"hello,web\n"]
    records = list(csv_records(iter(lines), "bom.csv", CsvColumns()))
    assert records == [("bom.csv:2", {"text": "hello", "metadata": {"channel": "web"}})]


def test_csv_reader_refuses_bad_quoting_row_by_row_instead_of_gluing_rows() -> None:
    """An unterminated quote used to swallow every later row into one text, silently; text
    after a closing quote was kept. Now each is an error naming the lines it spans (an
    unterminated quote still takes the lines up to the next quote: CSV cannot say where the
    field was meant to end), and reading goes on after them."""
    lines = [
        b"text,id\n",
        b"fine,1\n",
        b'"quoted"then more,2\n',
        b'"a quoted\n',
        b'two-line text",3\n',
        b'"unterminated,4\n',
        b"swallowed before,5\n",
    ]
    records = list(csv_records(iter(lines), "q.csv", CsvColumns()))
    assert [where for where, _ in records] == ["q.csv:2", "q.csv:3", "q.csv:4-5", "q.csv:6-7"]
    assert records[0][1] == {"text": "fine", "id": "1"}
    assert str(records[1][1]) == "malformed CSV row: ',' expected after '\"'"
    assert records[2][1] == {"text": "a quoted\ntwo-line text", "id": "3"}
    assert str(records[3][1]) == ("malformed CSV row: unexpected end of data (lines 6-7 skipped)")
    # Two bad rows in a row are each named at their own line.
    twice = [b"text,id\n", b'"a"b,1\n', b'"c"d,2\n', b"ok,3\n"]
    wheres = [where for where, _ in csv_records(iter(twice), "t.csv", CsvColumns())]
    assert wheres == ["t.csv:2", "t.csv:3", "t.csv:4"]


def test_csv_reader_refuses_a_malformed_header_in_one_line() -> None:
    with pytest.raises(UnusableSource, match=r"^h.csv: malformed CSV header: "):
        csv_records(iter([b'id,"te"xt\n', b"1,hello\n"]), "h.csv", CsvColumns())


# --- chunking ---------------------------------------------------------------------------


def test_chunks_deliver_every_record_in_order(redis: Redis, settings: Settings, keys: Keys) -> None:
    chunks: list[int] = []
    producer = Producer(redis, settings, chunk_size=7, default_task="sentiment")
    report = producer.send(
        ({"id": f"c{n:02d}", "text": f"ticket number {n}"} for n in range(20)),
        on_progress=chunks.append,
    )
    assert report.produced == 20
    assert chunks == [7, 7, 6]
    assert [i["id"] for i in stream_items(redis, keys)] == [f"c{n:02d}" for n in range(20)]


def test_chunk_boundaries_ignore_invalid_records(
    redis: Redis, settings: Settings, keys: Keys
) -> None:
    chunks: list[int] = []
    records = [
        {"id": f"c{n}", "task": "sentiment", "text": "" if n % 3 == 0 else f"t{n}"}
        for n in range(12)
    ]
    report = Producer(redis, settings, chunk_size=4).send(records, on_progress=chunks.append)
    assert report.produced == 8
    assert chunks == [4, 4]
    assert len(report.invalid) == 4
    assert [i["id"] for i in stream_items(redis, keys)] == [
        f"c{n}" for n in range(12) if n % 3 != 0
    ]


# --- following a growing file -----------------------------------------------------------


def test_lines_follow_a_growing_file_and_never_yield_half_lines(tmp_path: Path) -> None:
    path = tmp_path / "growing.jsonl"
    path.write_bytes(b"one\n")
    half_written = threading.Event()  # "tw" is in the file
    completed = threading.Event()  # "tw" has become "two\n"
    stop = threading.Event()
    deadline = time.monotonic() + 5

    def writer() -> None:
        with path.open("ab") as f:
            time.sleep(0.1)
            f.write(b"tw")
            f.flush()
            half_written.set()
            time.sleep(0.3)  # many polls see the half line at EOF
            completed.set()
            f.write(b"o\nthree\n")
            f.flush()

    thread = threading.Thread(target=writer, daemon=True)
    got: list[tuple[bytes, bool]] = []
    lines = Lines(
        str(path),
        follow=True,
        stop=lambda: stop.is_set() or time.monotonic() > deadline,
        poll_s=0.02,
    )
    read = (line for line in lines if isinstance(line, bytes))
    thread.start()
    for line in read:
        got.append((line, completed.is_set()))
        if len(got) == 3:
            break
    thread.join(timeout=5)
    assert half_written.is_set()

    # An unterminated last line is read but never yielded while following, up to the
    # stop request, which ends the generator.
    with path.open("ab") as f:
        f.write(b"four-without-newline")
    timer = threading.Timer(0.3, stop.set)
    timer.start()
    rest = list(read)
    timer.join()

    assert [line for line, _ in got] == [b"one\n", b"two\n", b"three\n"]
    assert got[1][1], "b'two\\n' was yielded before its second half was written"
    assert rest == []
    assert lines.position.offset == len(b"one\ntwo\nthree\n")  # stored up to there, no further
    assert lines.position.line == 3
    assert time.monotonic() < deadline


def test_lines_without_follow_yields_the_last_line_even_without_newline(
    tmp_path: Path,
) -> None:
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"a\nb\nc")
    assert list(Lines(str(path))) == [b"a\n", b"b\n", b"c", Ended(final=True)]
    # With a checkpoint the last line may still be being written: not given, not final.
    assert list(Lines(str(path), complete_only=True)) == [b"a\n", b"b\n", Ended(final=False)]


def test_lines_stop_when_asked_even_at_eof_while_following(tmp_path: Path) -> None:
    path = tmp_path / "quiet.jsonl"
    path.write_bytes(b"x\n")
    stop = threading.Event()
    timer = threading.Timer(0.3, stop.set)
    started = time.monotonic()
    timer.start()
    got = list(Lines(str(path), follow=True, stop=stop.is_set, poll_s=0.02))
    assert got[0] == b"x\n"
    assert set(got[1:-1]) == {IDLE}  # said at each look at the end of the file
    assert got[-1] == Ended(final=False)  # stopped: anything left open is unfinished
    assert time.monotonic() - started < 3


# --- backpressure -----------------------------------------------------------------------


def test_send_waits_while_the_slowest_group_lags_too_far(
    redis: Redis, make_settings: Any, keys: Keys
) -> None:
    s = make_settings(max_backlog=5)
    redis.xgroup_create(keys.items, "worker:slow", id="0", mkstream=True)
    producer = Producer(redis, s, chunk_size=5, default_task="sentiment")
    records = [{"id": f"b{n:02d}", "text": f"ticket {n}"} for n in range(20)]
    outcome: dict[str, Any] = {}

    def send() -> None:
        try:
            outcome["report"] = producer.send(records)
        except Exception as exc:  # surfaced by the assertions below
            outcome["error"] = exc

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    deadline = time.monotonic() + 20
    # Let the producer fill the backlog past max_backlog before anything is read, so it
    # must wait for this slow reader.
    while redis.xlen(keys.items) < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    lags: list[int] = []
    read: list[bytes] = []
    with Redis.from_url(s.redis_url) as reader:
        while time.monotonic() < deadline:
            if sender.is_alive():
                lags.append(group_lag(reader, keys.items, "worker:slow"))
            reply = reader.xreadgroup("worker:slow", "c1", {keys.items: ">"}, count=1)
            for _stream, entries in reply or []:
                for entry_id, _fields in entries:
                    read.append(entry_id)
                    reader.xack(keys.items, "worker:slow", entry_id)
            if not reply and not sender.is_alive():
                break
            time.sleep(0.03)
    sender.join(timeout=5)

    assert "error" not in outcome, outcome.get("error")
    assert not sender.is_alive(), "send never completed"
    report = outcome["report"]
    assert report.produced == 20
    assert report.invalid == []
    assert report.waited_s > 0
    assert len(read) == 20
    assert [i["id"] for i in stream_items(redis, keys)] == [r["id"] for r in records]
    assert lags, "the lag was never sampled while sending"
    assert max(lags) <= s.max_backlog + producer.chunk_size
    assert max(lags) > s.max_backlog  # the sampling did see the backlog it had to wait on


def test_backlog_is_the_stream_length_before_any_group_exists(
    redis: Redis, settings: Settings, keys: Keys
) -> None:
    producer = Producer(redis, settings)
    assert producer.backlog() == 0  # no stream at all yet
    for n in range(7):
        redis.xadd(keys.items, {"d": b"{}", "n": n})
    assert producer.backlog() == redis.xlen(keys.items) == 7


def test_backlog_is_the_lag_of_the_slowest_group(
    redis: Redis, settings: Settings, keys: Keys
) -> None:
    for n in range(10):
        redis.xadd(keys.items, {"d": b"{}", "n": n})
    redis.xgroup_create(keys.items, "worker:fast", id="0")
    redis.xgroup_create(keys.items, "worker:slow", id="0")
    redis.xreadgroup("worker:fast", "c", {keys.items: ">"}, count=8)
    redis.xreadgroup("worker:slow", "c", {keys.items: ">"}, count=3)
    producer = Producer(redis, settings)

    assert group_lag(redis, keys.items, "worker:fast") == 2
    assert group_lag(redis, keys.items, "worker:slow") == 7
    assert producer.backlog() == 7

    redis.xreadgroup("worker:slow", "c", {keys.items: ">"}, count=6)
    assert producer.backlog() == 2  # now the other group is the slowest

    redis.xadd(keys.items, {"d": b"{}"})
    assert producer.backlog() == 3  # new entries count against every group

    redis.xgroup_create(keys.items, "worker:late", id="0")
    assert producer.backlog() == 11  # a group that has read nothing is the slowest


def test_send_at_a_rate_spreads_the_records_over_time(redis: Redis, settings: Settings) -> None:
    """Pacing, not speed: 20 records at 40/s cannot all be sent in under ~0.4 s."""
    started = time.monotonic()
    report = Producer(redis, settings, chunk_size=5).send(
        [{"task": "sentiment", "text": f"t{n}"} for n in range(20)], rate=40
    )
    assert report.produced == 20
    assert time.monotonic() - started >= 0.45


def test_an_input_format_is_added_in_one_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A throwaway tab-separated format, registered in producers.readers.FORMATS only: a file
    with its extension is read with it, --format accepts its name, an unknown name is one
    line naming the known ones."""
    from producers import readers

    def tsv_records(lines: Any, name: str, how: Any) -> Any:
        lines = (line for line in lines if isinstance(line, bytes))  # markers: see follow.py
        for n, line in enumerate(lines, 1):
            ident, text = line.decode().rstrip("\n").split("\t")
            yield f"{name}:{n}", how.record({"id": ident, "text": text})

    monkeypatch.setitem(readers.FORMATS, "tsv", tsv_records)
    path = tmp_path / "desk.tsv"
    path.write_text("t-1\tThe export hangs.\nt-2\tThanks, all good now!\n")
    got = list(readers.records_of(str(path)))
    assert [(where, r["id"], r["text"]) for where, r in got] == [  # type: ignore[index]
        (f"{path}:1", "t-1", "The export hangs."),
        (f"{path}:2", "t-2", "Thanks, all good now!"),
    ]
    same = list(readers.records_of(str(path.rename(tmp_path / "desk.txt")), Reading("tsv")))
    assert [r for _, r in same] == [r for _, r in got]
    with pytest.raises(UnusableSource, match="--format xml: one of jsonl, csv, tsv"):
        readers.records_of(str(tmp_path / "desk.txt"), Reading("xml"))
