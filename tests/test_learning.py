"""The fleet learns from its judge: lessons, the student, the reliability counts and the
posterior rule, on a real Redis (issue 25)."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import orjson
import pydantic
import pytest
from redis import Redis
from test_consumers import Fleet as ScriptedFleet
from test_consumers import Scripted, drain
from test_status import status_text

from common.keys import AGGREGATOR_GROUP, JUDGE_GROUP, RECORD_FIELD, Keys, worker_group
from common.schemas import Escalation, Item, Vote
from common.settings import ModelSpec, Settings
from common.tasks import BUILTIN_TASKS, TaskSpec
from consumers.aggregator import AggregatorHandler, sampled
from consumers.backends.student import Student
from consumers.decision import Posterior, decide
from consumers.engine.runtime import Runtime
from consumers.judge import JudgeHandler
from consumers.lessons import Lesson, LessonFeed, Source, teach
from consumers.reliability import FitPolicy, Reliability, Threshold
from consumers.worker import WorkerHandler
from producers.api import Producer
from tribunal.demo import load_sample
from tribunal.ops.status import snapshot


def lessons_of(records: list[dict[str, Any]]) -> list[Lesson]:
    return [
        Lesson(
            id=r["id"], task=r["task"], text=r["text"], text_b=r.get("text_b"), label=r["gold"],
            source="gold",
        )
        for r in records
    ]  # fmt: skip


def accuracy(student: Student, records: list[dict[str, Any]]) -> float:
    items = [
        Item(id=r["id"], task=r["task"], text=r["text"], text_b=r.get("text_b")) for r in records
    ]
    predictions = student.classify(items)
    return sum(p.label == r["gold"] for p, r in zip(predictions, records, strict=True)) / len(items)


def test_the_students_accuracy_on_held_out_tickets_rises_with_lessons() -> None:
    tickets = load_sample("sentiment")
    held_out, stream = tickets[-60:], tickets[:-60]
    scores = []
    for n in (30, len(stream)):
        student = Student({"min_per_class": 3}, BUILTIN_TASKS)
        student.tasks["sentiment"].learn(lessons_of(stream[:n]))
        scores.append(accuracy(student, held_out))
    majority = Counter(r["gold"] for r in held_out).most_common(1)[0][1] / len(held_out)
    assert scores[0] < scores[1], scores
    assert scores[1] > majority, (scores, majority)  # it learned more than the base rate


def test_the_student_learns_pairs_from_what_the_two_tickets_share() -> None:
    pairs = load_sample("similar_ticket")
    held_out = pairs[-40:]
    student = Student({"min_per_class": 3}, BUILTIN_TASKS)
    student.tasks["similar_ticket"].learn(lessons_of(pairs[:10]))
    before = accuracy(student, held_out)
    student.tasks["similar_ticket"].learn(lessons_of(pairs[10:-40]))
    assert accuracy(student, held_out) > before


def test_the_student_abstains_until_it_has_seen_every_label() -> None:
    student = Student({"min_per_class": 2}, BUILTIN_TASKS)
    model = student.tasks["sentiment"]
    item = Item(id="x", task="sentiment", text="the export is broken again")
    for label in ("negative", "negative", "positive", "positive", "neutral"):
        model.learn([Lesson(id="l", task="sentiment", text="t", label=label, source="gold")])
        [p] = student.classify([item])
        assert p.label is None and "still learning" in (p.error or "")
    model.learn([Lesson(id="l", task="sentiment", text="t", label="neutral", source="gold")])
    [p] = student.classify([item])
    assert p.label in ("positive", "negative", "neutral") and 0 < (p.confidence or 0) <= 1
    [other] = student.classify([Item(id="y", task="unknown", text="t")])
    assert other.label is None and "does not know task" in (other.error or "")


def test_a_restarted_student_resumes_from_its_snapshot_and_reads_only_newer_lessons(
    redis: Redis, settings: Settings
) -> None:
    tickets = load_sample("sentiment")
    assert teach(redis, settings.namespace, 2, lessons_of(tickets[:100])) == 100
    first = Student({"min_per_class": 3}, BUILTIN_TASKS)
    assert first.learn(LessonFeed(redis, settings.namespace, 2, "student")) == 100
    first.save()
    teach(redis, settings.namespace, 2, lessons_of(tickets[100:103]))

    again = Student({"min_per_class": 3}, BUILTIN_TASKS)
    feed = LessonFeed(redis, settings.namespace, 2, "student")
    assert again.learn(feed) == 3  # the snapshot covered the first 100
    assert sum(again.tasks["sentiment"].counts.values()) == 103
    fresh = Student({"min_per_class": 3}, BUILTIN_TASKS)
    assert fresh.learn(LessonFeed(redis, settings.namespace, 2, "other")) == 103  # no snapshot
    held_out = tickets[-60:]
    items = [Item(id=r["id"], task="sentiment", text=r["text"]) for r in held_out]
    assert again.classify(items) == fresh.classify(items)  # counts: the same model


def test_an_unreadable_snapshot_is_ignored_and_the_stream_is_read_from_the_start(
    redis: Redis, settings: Settings
) -> None:
    tickets = load_sample("sentiment")
    teach(redis, settings.namespace, 1, lessons_of(tickets[:20]))
    key = Keys(settings.namespace).student("student")
    for bad in (b"not json", orjson.dumps({"version": 99, "offsets": {}, "state": {}})):
        redis.set(key, bad)
        student = Student({}, BUILTIN_TASKS)
        assert student.learn(LessonFeed(redis, settings.namespace, 1, "student")) == 20
    redis.set(key, orjson.dumps({"version": 1, "offsets": {"0": "0-0"}, "state": {
        "sentiment": {"counts": {}, "columns": ["AAAA"], "values": []}}}))  # fmt: skip
    student = Student({}, BUILTIN_TASKS)
    assert student.learn(LessonFeed(redis, settings.namespace, 1, "student")) == 20


def simulate(
    accuracies: dict[str, float], n: int, rng: random.Random, labels: list[str]
) -> list[tuple[str, list[Vote]]]:
    """Items with a known truth and votes from voters of known accuracy; a voter's
    confidence says nothing (a constant), so only its counts can tell them apart."""
    out = []
    for _ in range(n):
        truth = rng.choice(labels)
        votes = []
        for voter, acc in accuracies.items():
            wrong = [x for x in labels if x != truth]
            label = truth if rng.random() < acc else rng.choice(wrong)
            votes.append(Vote(worker=voter, label=label, confidence=0.9))
        out.append((truth, votes))
    return out


@pytest.mark.parametrize("target", [0.9, 0.97])
def test_the_posterior_rule_keeps_its_target_when_voter_reliabilities_are_known(
    target: float,
) -> None:
    rng = random.Random(7)
    labels = ["positive", "negative", "neutral"]
    voters = {"good": 0.92, "fair": 0.8, "coin": 1 / 3}
    lessons = [  # the judge's labels so far, on every item
        Lesson(id=f"c{i}", task="t", text="-", label=truth, source="judge", votes=votes)
        for i, (truth, votes) in enumerate(simulate(voters, 3000, rng, labels))
    ]
    table = Reliability({"t": labels}, window=3000)
    table.learn(lessons)
    table.refit(FitPolicy(target, 0.1, [], lambda vote: True))
    chosen = table.thresholds["t"]
    assert chosen.value is not None and chosen.bound is not None and chosen.bound >= target
    rule = Posterior(n_workers=3, quorum=1, target=target, table=table)
    accepted = right = 0
    for truth, votes in simulate(voters, 4000, rng, labels):
        ruling = decide(votes, rule, final=True, task="t")
        if ruling.kind == "accept":
            accepted += 1
            right += ruling.label == truth
    assert accepted > 1000  # it accepts a useful share...
    assert right / accepted >= target - 0.01  # ...and keeps the agreement it was asked for
    # A voter no better than chance settles nothing alone, however sure it says it is.
    coin_alone = [v for v in simulate(voters, 50, rng, labels)[0][1] if v.worker == "coin"]
    assert decide(coin_alone, rule, final=True, task="t").kind == "escalate"


def test_the_posterior_rule_never_accepts_a_label_nobody_voted_for() -> None:
    table = Reliability({"t": ["a", "b"]})
    # The judge said "a" 990 times; "x" always agreed with it, "new" was never checked.
    table.load({("t", "x", "a@7", "a"): 990, ("t", "x", "b@7", "b"): 10})
    table.thresholds = {"t": Threshold(0.9, 0.95, 1000)}
    rule = Posterior(n_workers=2, quorum=1, target=0.9, table=table)
    unchecked = [Vote(worker="new", label="b", confidence=0.99)]
    assert decide(unchecked, rule, final=True, task="t").kind == "escalate"
    outside = [Vote(worker="x", label="zzz", confidence=0.99)]
    assert decide(outside, rule, final=True, task="t").kind == "escalate"
    trusted = [Vote(worker="x", label="b", confidence=0.99)]
    assert decide(trusted, rule, final=True, task="t").label == "b"


def test_a_snapshot_made_for_other_labels_is_not_used_and_every_lesson_is_learned_again(
    redis: Redis, settings: Settings
) -> None:
    old = {"review": TaskSpec(labels=["pos", "neg"], instructions="x")}
    new = {"review": TaskSpec(labels=["pos", "mixed"], instructions="x")}
    lessons = [
        Lesson(id=f"l{i}", task="review", text=f"text {i}", label=label, source="gold")
        for i, label in enumerate(["pos", "neg", "mixed"] * 4)
    ]
    teach(redis, settings.namespace, 1, lessons)
    before = Student({"min_per_class": 1}, old)
    before.learn(LessonFeed(redis, settings.namespace, 1, "student"))
    before.save()
    after = Student({"min_per_class": 1}, new)
    assert after.learn(LessonFeed(redis, settings.namespace, 1, "student")) == 12  # all again
    assert after.tasks["review"].counts == Counter({"pos": 4, "mixed": 4})  # no stale "neg"


def test_the_threshold_waits_for_evidence_and_weighs_audits_as_the_items_they_stand_for() -> None:
    labels = ["a", "b"]
    table = Reliability({"t": labels})

    def lesson(i: int, vote: str, judge: str, source: Source) -> Lesson:
        votes = [Vote(worker="x", label=vote, confidence=0.99)]
        return Lesson(id=f"l{i}", task="t", text="-", label=judge, source=source, votes=votes)

    table.learn([lesson(i, "a", "a", "judge") for i in range(10)])
    table.refit(FitPolicy(0.8, 0.1, [], lambda vote: True))
    assert table.thresholds["t"].value is None  # ten agreeing labels are not enough evidence
    table.learn([lesson(100 + i, "a", "a", "judge") for i in range(60)])
    table.refit(FitPolicy(0.8, 0.1, [], lambda vote: True))
    assert table.thresholds["t"].value is not None
    # Audits of accepted items: two disagreements in ten stand for twenty in a hundred.
    table.learn([lesson(200 + i, "a", "b" if i < 2 else "a", "audit") for i in range(10)])
    table.refit(FitPolicy(0.9, 0.1, [], lambda vote: True))
    assert table.thresholds["t"].value is None, table.thresholds


def test_the_threshold_is_fitted_on_the_votes_the_rule_decides_with_tier_by_tier() -> None:
    """A cheap first tier that is sure of itself and often wrong, then a good second tier:
    fitted on every item's final votes, its mistakes would look settled by the second tier
    and the rule would accept them on the first tier's vote alone (a reviewer measured 0.70
    live against a claimed 0.96). Scored tier by tier, the bound holds live."""
    rng = random.Random(11)
    labels = ["a", "b"]
    tiers = [["cheap"], ["good"]]

    def votes_for(truth: str) -> list[Vote]:
        wrong = "b" if truth == "a" else "a"
        cheap = truth if rng.random() < 0.7 else wrong
        good = truth if rng.random() < 0.97 else wrong
        return [
            Vote(worker="cheap", label=cheap, confidence=0.99),  # always sure
            Vote(worker="good", label=good, confidence=0.9),
        ]

    lessons = []
    for i in range(2000):
        truth = rng.choice(labels)
        lessons.append(Lesson(id=f"l{i}", task="t", text="-", label=truth, source="judge",
                              votes=votes_for(truth)))  # fmt: skip
    table = Reliability({"t": labels})
    table.learn(lessons)
    table.refit(FitPolicy(0.9, 0.1, tiers, lambda vote: True))
    rule = Posterior(n_workers=2, quorum=1, target=0.9, table=table, tiers=(("cheap",), ("good",)))
    live = [(truth, votes_for(truth)) for truth in (rng.choice(labels) for _ in range(3000))]
    accepted, agreement = decide_two_tiers(rule, live)
    assert accepted > 1000
    assert agreement >= 0.9


def decide_two_tiers(rule: Posterior, live: list[tuple[str, list[Vote]]]) -> tuple[int, float]:
    """Decide each (truth, [first tier's vote, second's]) as the aggregator does: on the first
    tier's vote alone, then, if the rule waits, on both. How many were accepted, and the
    share of those that were right."""
    accepted = right = 0
    for truth, votes in live:
        ruling = decide(votes[:1], rule, task="t")  # the first tier alone, the second to come
        if ruling.kind == "wait":
            ruling = decide(votes, rule, final=True, task="t")
        if ruling.kind == "accept":
            accepted += 1
            right += ruling.label == truth
    return accepted, right / accepted if accepted else 0.0


def test_a_vote_that_moved_nothing_is_not_accepted_on_a_two_label_task() -> None:
    table = Reliability({"t": ["a", "b"]})
    lessons = [
        Lesson(id=f"l{i}", task="t", text="-", label="a", source="judge",
               votes=[Vote(worker="x", label="a", confidence=0.9)])
        for i in range(200)
    ]  # fmt: skip
    table.learn(lessons)
    table.refit(FitPolicy(0.6, 0.1, [], lambda vote: True))
    assert (table.thresholds["t"].value or 0) > 0.5  # 1/2 is never a threshold
    rule = Posterior(n_workers=2, quorum=1, target=0.6, table=table)
    stranger = [Vote(worker="never-seen", label="b", confidence=0.99)]
    assert decide(stranger, rule, final=True, task="t").kind == "escalate"


def test_gold_lessons_do_not_push_the_voters_evidence_out_of_the_window() -> None:
    table = Reliability({"t": ["a", "b"]}, window=50)
    vote = [Vote(worker="x", label="a", confidence=0.9)]
    table.learn(Lesson(id=f"v{i}", task="t", text="-", label="a", source="judge", votes=vote)
                for i in range(50))  # fmt: skip
    table.learn(Lesson(id=f"g{i}", task="t", text="-", label="b", source="gold")
                for i in range(100))  # fmt: skip
    assert table.agreement() == [("t", "x", 50, 50)]


def test_a_fit_on_an_explored_sample_weighs_it_as_the_items_it_stands_for() -> None:
    """While nothing is trusted, only a quarter of the items reach the second tier. A cheap
    first tier is sure (and right) on half the items; the second tier is right on 75%. The
    lessons are as that phase leaves them: the explored ones with both votes and sampling
    rate 0.25, the rest with the first tier's vote only. Weighing the explored ones' second-tier
    acceptances by 4, the fitted threshold keeps its target live, with every tier asked
    again; counted once each, they look rarer than they are and the bound is overstated."""
    rng = random.Random(14)
    labels = ["a", "b"]

    def votes_for(truth: str) -> list[Vote]:
        wrong = "b" if truth == "a" else "a"
        sure = rng.random() < 0.5
        cheap = truth if sure or rng.random() < 0.6 else wrong
        good = truth if rng.random() < 0.75 else wrong
        return [
            Vote(worker="cheap", label=cheap, confidence=0.99 if sure else 0.6),
            Vote(worker="good", label=good, confidence=0.9),
        ]

    weighted, counted_once = [], []
    for i in range(2000):
        truth = rng.choice(labels)
        votes = votes_for(truth)
        explored = rng.random() < 0.25
        lesson = Lesson(id=f"l{i}", task="t", text="-", label=truth, source="judge",
                        votes=votes if explored else votes[:1],
                        sampling_rate=0.25 if explored else None)  # fmt: skip
        weighted.append(lesson)
        counted_once.append(lesson.model_copy(update={"sampling_rate": None}))
    live = [(truth, votes_for(truth)) for truth in (rng.choice(labels) for _ in range(3000))]

    def fit_and_run(lessons: list[Lesson]) -> tuple[Threshold, float]:
        table = Reliability({"t": labels})
        table.learn(lessons)
        table.refit(FitPolicy(0.9, 0.1, [["cheap"], ["good"]], lambda vote: True))
        rule = Posterior(n_workers=2, quorum=1, target=0.9, table=table,
                         tiers=(("cheap",), ("good",)))  # fmt: skip
        accepted, agreement = decide_two_tiers(rule, live)
        assert accepted > 1000
        return table.thresholds["t"], agreement

    chosen, agreement = fit_and_run(weighted)
    assert chosen.bound is not None and chosen.bound >= 0.9 and agreement >= 0.9
    chosen, agreement = fit_and_run(counted_once)
    assert chosen.bound is not None and chosen.bound >= 0.9 and agreement < 0.9


def test_with_no_judge_labels_yet_the_posterior_rule_sends_everything_to_the_judge() -> None:
    rule = Posterior(n_workers=3, quorum=1, target=0.9, table=Reliability({"t": ["a", "b"]}))
    unanimous = [Vote(worker=w, label="a", confidence=0.99) for w in ("x", "y", "z")]
    assert decide(unanimous, rule, final=True, task="t").kind == "escalate"
    assert decide(unanimous[:1], rule, final=False, task="t").kind == "wait"


TASK = TaskSpec(labels=["fruit", "tool"], instructions="Is it a fruit or a tool?")
FRUIT = ["apple", "banana", "cherry", "grape", "lemon", "mango", "melon", "peach", "pear", "plum"]
TOOLS = [
    "hammer",
    "wrench",
    "saw",
    "drill",
    "chisel",
    "pliers",
    "spanner",
    "file",
    "level",
    "clamp",
]


def thing(rng: random.Random, n: int) -> dict[str, Any]:
    label = rng.choice(["fruit", "tool"])
    words = " ".join(rng.sample(FRUIT if label == "fruit" else TOOLS, 3))
    return {
        "id": f"i{n}",
        "task": "things",
        "text": words,
        "metadata": {"judge": label, "backup": label},
    }


class LearningFleet(ScriptedFleet):
    """A student first, a scripted backup worker only when the student did not settle the
    item (staged, quorum 1), the posterior rule, a scripted judge: in-process, real Redis."""

    def __init__(self, settings: Settings) -> None:
        self.rt = rt = Runtime.create(settings)
        options = {"min_per_class": 3, "snapshot_every_s": 0.01, "learn_every_s": 0}
        self.student = Student(options, settings.all_tasks)
        self.feed = LessonFeed(rt.redis, settings.namespace, settings.partitions, "student")
        self.backup = Scripted("backup")
        self.handlers = {
            "student": WorkerHandler(rt, "student", self.student, self.feed),
            "backup": WorkerHandler(rt, "backup", self.backup),
        }
        self.workers = {
            name: self._consumer(h.stream, worker_group(name), h)
            for name, h in self.handlers.items()
        }
        self.aggregator_handler = AggregatorHandler(rt)
        self.aggregator_handler._next_trim = float("inf")
        self.aggregator = self._consumer(rt.keys.ready, AGGREGATOR_GROUP, self.aggregator_handler)
        self.judge_backend = Scripted("judge")
        self.judge = self._consumer(
            rt.keys.judge, JUDGE_GROUP, JudgeHandler(rt, self.judge_backend)
        )

    def round(self) -> None:
        for handler in self.handlers.values():
            handler.tick()  # the student learns what the judge decided so far
        self.aggregator_handler.learning.next_at = 0.0
        self.aggregator_handler.tick()  # the aggregator counts the new lessons
        for name in ("student", "aggregator", "backup", "aggregator"):
            drain(self.aggregator if name == "aggregator" else self.workers[name])
        drain(self.judge)


def learning_settings(make_settings: Any, audit_fraction: float) -> Settings:
    """A student, then a scripted backup, the posterior rule at 0.9, a scripted judge."""
    settings: Settings = make_settings(
        workers={"student": ModelSpec(backend="student"), "backup": ModelSpec(backend="simulated")},
        judge=ModelSpec(backend="simulated"),
        tasks={"things": TASK},
        agreement="posterior",
        target_agreement=0.9,
        policy="staged",
        quorum=1,
        audit_fraction=audit_fraction,
        block_ms=20,
    )
    return settings


def test_tiers_skip_the_later_workers_once_the_student_has_earned_trust(
    make_settings: Any,
) -> None:
    fleet = LearningFleet(learning_settings(make_settings, audit_fraction=0.2))
    settings = fleet.rt.settings
    rng = random.Random(3)
    producer = Producer(fleet.rt.redis, settings)
    sources: list[list[str]] = []
    for r in range(12):
        batch = [thing(rng, 20 * r + k) for k in range(20)]
        assert producer.send(batch).produced == 20
        fleet.round()
        outputs = {d["id"]: d for d in fleet.outputs()}
        assert all(b["id"] in outputs for b in batch), "every item ends in its round"
        sources.append([outputs[b["id"]]["source"] for b in batch])
    assert sources[0] == ["judge"] * 20  # nothing is trusted at first
    late = fleet.outputs()[-40:]
    assert all(d["source"] == "workers" for d in late)  # the judge decides none of them
    # Many are settled on the student's vote alone: the backup worker never saw those items
    # (the others waited for its vote too: the student's bands for one label earn trust
    # sooner than for the other).
    alone = [d for d in late if [v["worker"] for v in d["votes"]] == ["student"]]
    assert len(alone) >= 15, [d["reason"] for d in late]
    assert all(d["label"] == d["metadata"]["judge"] for d in fleet.outputs())
    # The judge's labels became lessons; the student's state is in Redis, with its offsets.
    lessons = sum(fleet.rt.redis.xlen(k.lessons) for k in [fleet.rt.keys])
    assert lessons == sum(s.count("judge") for s in sources) + fleet.rt.redis.xlen(
        fleet.rt.keys.audits
    )
    snapshot = orjson.loads(fleet.rt.redis.get(Keys(settings.namespace).student("student")))
    assert snapshot["version"] == 1 and snapshot["state"]["tasks"]["things"]["counts"]
    # Each final record says what it cost: the student's share of its batches' time.
    assert all(d["model_calls"] == len(d["votes"]) + (d["judge"] is not None) for d in late)


def test_an_untrusted_task_sends_only_its_explored_sample_past_the_first_tier(
    make_settings: Any,
) -> None:
    fleet = LearningFleet(learning_settings(make_settings, audit_fraction=0.2))
    rng = random.Random(4)
    batch = [thing(rng, k) for k in range(40)]
    assert Producer(fleet.rt.redis, fleet.rt.settings).send(batch).produced == 40
    fleet.round()
    outputs = {d["id"]: d for d in fleet.outputs()}
    assert sorted(outputs) == sorted(b["id"] for b in batch)
    assert all(d["source"] == "judge" for d in outputs.values())  # nothing is trusted yet
    # Only the explored quarter (a stable sample of ids) reached the backup worker: its
    # votes could settle nothing yet; the others went to the judge without waiting for it.
    explored = {b["id"] for b in batch if sampled(b["id"], 0.25, salt=b"explore")}
    assert 3 <= len(explored) <= 20
    asked = {i for i, d in outputs.items() if "backup" in {v["worker"] for v in d["votes"]}}
    assert asked == explored
    for item_id, d in outputs.items():
        skipped = "things accepts nothing yet: tier 1 skipped, judge asked" in d["reason"]
        assert skipped == (item_id not in explored), d["reason"]
        assert d["model_calls"] == len(d["votes"]) + 1
    # Their lessons say they stand for four items each past the first tier.
    entries = fleet.rt.redis.xrange(fleet.rt.keys.lessons)
    lessons = {x.id: x for x in (Lesson.model_validate_json(f[RECORD_FIELD]) for _, f in entries)}
    assert sorted(lessons) == sorted(outputs)
    assert {i for i, x in lessons.items() if x.sampling_rate == 0.25} == explored
    assert all(x.sampling_rate is None for i, x in lessons.items() if i not in explored)
    # status says so: forty labels keep no threshold's bound yet
    snap = snapshot(fleet.rt.redis, fleet.rt.settings)
    assert [(t.threshold, t.explored) for t in snap.thresholds] == [(None, 0.25)]
    assert "25% of items still go past tier 0" in status_text(snap)


def test_an_explored_item_keeps_the_rate_it_was_sent_on_at_whatever_the_rule_says_later(
    make_settings: Any,
) -> None:
    """The rule may trust the task, or stop trusting it, between an item's first tier and its
    escalation: the lesson weighs it by what happened when it was sent on (the rate kept in
    its votes hash), not by what the rule says when the judge is asked."""
    fleet = LearningFleet(learning_settings(make_settings, audit_fraction=0.2))
    rules = fleet.aggregator_handler
    assert isinstance(rules.rule, Posterior)
    rules.learning.next_at = float("inf")  # the thresholds below change only here
    thresholds = rules.rule.table.thresholds
    producer = Producer(fleet.rt.redis, fleet.rt.settings)
    rng = random.Random(5)

    def through(batch: list[dict[str, Any]], trusted_at_first: bool) -> dict[str, Lesson]:
        """The batch's first tier votes, the aggregator sends items on with the task trusted
        or not; then it is the other way round while the backup votes and the judge is asked."""
        assert producer.send(batch).produced == len(batch)
        for trusted in (trusted_at_first, not trusted_at_first):
            if trusted:
                thresholds["things"] = Threshold(0.9999, 0.95, 40.0)
            else:
                thresholds.pop("things", None)
            drain(fleet.workers["student" if trusted == trusted_at_first else "backup"])
            drain(fleet.aggregator)
        drain(fleet.judge)
        entries = fleet.rt.redis.xrange(fleet.rt.keys.lessons)
        lessons = (Lesson.model_validate_json(f[RECORD_FIELD]) for _, f in entries)
        return {x.id: x for x in lessons if x.id in {b["id"] for b in batch}}

    # Untrusted when sent on: only the explored sample reached the backup, and its lessons
    # stand for four items each, though the task was trusted when they were escalated.
    first = [thing(rng, k) for k in range(40)]
    explored = {b["id"] for b in first if sampled(b["id"], 0.25, salt=b"explore")}
    lessons = through(first, trusted_at_first=False)
    assert sorted(lessons) == sorted(b["id"] for b in first)
    assert 3 <= len(explored) <= 20
    assert {i for i, x in lessons.items() if x.sampling_rate == 0.25} == explored
    assert {i for i, x in lessons.items() if "backup" in {v.worker for v in x.votes}} == explored
    # their reasons say the bar the posterior did not reach (not 0.5, as the scores suggest)
    reasons = {d["id"]: d["reason"] for d in fleet.outputs()}
    assert all("; things needs 0.9999): 2/2 votes" in reasons[i] for i in explored), reasons
    # Trusted when sent on: every item reached the backup and none was sampled, though the
    # task accepted nothing again when they were escalated (ids in the sample included).
    second = [thing(rng, 100 + k) for k in range(40)]
    lessons = through(second, trusted_at_first=True)
    assert sorted(lessons) == sorted(b["id"] for b in second)
    assert any(sampled(i, 0.25, salt=b"explore") for i in lessons)
    assert all(x.sampling_rate is None for x in lessons.values())
    assert all("backup" in {v.worker for v in x.votes} for x in lessons.values())
    reasons = {d["id"]: d["reason"] for d in fleet.outputs()}
    assert all("; things accepts nothing yet): 2/2" in reasons[i] for i in lessons), reasons


def test_a_record_without_a_sampling_rate_is_written_as_the_release_before_wrote_it() -> None:
    """Records refuse unknown fields, so a field added later is left out while unset: an
    older judge or student still reads the escalations and lessons that do not need it."""
    item = Item(id="i1", task="t", text="-")
    plain = Escalation(item=item, votes=[], reason="r", escalated_at=1.0)
    assert b"sampling_rate" not in plain.dump()
    assert b"sampling_rate" not in Lesson.of(item, "a", "judge").dump()
    explored = plain.model_copy(update={"sampling_rate": 0.25})
    assert orjson.loads(explored.dump())["sampling_rate"] == 0.25
    for bad in (0, 1.5, float("nan")):
        with pytest.raises(pydantic.ValidationError):
            Lesson.of(item, "a", "judge", sampling_rate=bad)


def test_status_shows_what_the_fleet_learned_and_the_exporter_serves_it(
    make_settings: Any,
) -> None:
    from prometheus_client import generate_latest

    from tribunal.ops.exporter import registry_for
    from tribunal.ops.status import snapshot

    fleet = LearningFleet(learning_settings(make_settings, audit_fraction=1.0))
    settings = fleet.rt.settings
    rng = random.Random(5)
    producer = Producer(fleet.rt.redis, settings)
    for r in range(6):
        producer.send([thing(rng, 20 * r + k) for k in range(20)])
        fleet.round()
    snap = snapshot(fleet.rt.redis, settings)
    rows = {(row.task, row.voter): row for row in snap.reliability}
    assert rows[("things", "backup")].agreement == 1.0  # the scripted backup is always right
    assert rows[("things", "student")].labels > 0
    assert snap.audits.judged > 0 and snap.audit_agreement_at_least is not None
    assert 0 < snap.audit_agreement_at_least < 1  # a lower bound: below the 100% observed
    assert snap.cost is not None and snap.cost.labels == 120
    assert "posterior rule things" in status_text(snap)
    # what each tier and the judge spent per label, summing to the whole
    cost = snap.cost
    assert cost is not None and cost.per_label_s is not None
    assert [t.tier for t in cost.by_tier] == ["student", "backup", "judge"]
    assert sum(t.per_label_s for t in cost.by_tier) == pytest.approx(cost.per_label_s, abs=0.001)
    assert "by tier: student " in status_text(snap)
    scraped = generate_latest(registry_for(settings)).decode()
    assert 'tribunal_voter_agreement{task="things",voter="backup"} 1.0' in scraped
    assert 'tribunal_tier_model_seconds_per_label{tier="judge"}' in scraped


def test_teach_stores_gold_lessons_and_reports_the_records_it_skipped(
    settings: Settings, redis: Redis, tmp_path: Any
) -> None:
    import os
    import subprocess
    import sys

    path = tmp_path / "gold.jsonl"
    path.write_text(
        '{"task": "sentiment", "text": "refund never came", "gold": "negative"}\n'
        '{"task": "sentiment", "text": "thanks a lot", "gold": "positive"}\n'
        '{"task": "sentiment", "text": "no label here"}\n'
        '{"task": "sentiment", "text": "wrong label", "gold": "happy"}\n'
    )
    env = {
        **os.environ,
        "TRIBUNAL_REDIS_URL": settings.redis_url or "",
        "TRIBUNAL_NAMESPACE": settings.namespace,
    }
    done = subprocess.run(
        [sys.executable, "-m", "tribunal", "teach", str(path)],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = done.stdout + done.stderr
    assert "taught 2 lessons, skipped 2" in out
    assert "gold.jsonl:3: no gold label" in out
    assert "gold.jsonl:4: gold label 'happy' is not one of" in out
    assert "Traceback" not in out
    feed = LessonFeed(redis, settings.namespace, settings.partitions, "student")
    assert sorted((x.text, x.label, x.source) for x in feed.read()) == [
        ("refund never came", "negative", "gold"),
        ("thanks a lot", "positive", "gold"),
    ]


def test_the_posterior_rule_without_audits_is_refused_with_the_reason() -> None:
    from pydantic import ValidationError

    from common.settings import load_settings

    with pytest.raises(ValidationError, match="needs audit_fraction > 0"):
        load_settings(agreement="posterior")
    assert load_settings(agreement="posterior", audit_fraction=0.05).learns


def test_only_the_step_out_of_the_first_tier_is_sampled(make_settings: Any) -> None:
    """Three tiers: items sent past the first while the task was trusted all reached the
    second; if the rule stops trusting the task before the third, they go on unsampled
    (no rate, weighed as themselves) rather than as a sample of the step they all took."""
    from test_consumers import Fleet, produce

    workers = {n: ModelSpec(backend="simulated") for n in ("alpha", "beta", "gamma")}
    settings = make_settings(
        workers=workers, tiers=[["alpha"], ["beta"], ["gamma"]], agreement="posterior",
        policy="staged", quorum=1, block_ms=20, vote_timeout_s=60, audit_fraction=0.2,
    )  # fmt: skip
    fleet = Fleet(settings)
    rules = fleet.aggregator_handler
    assert isinstance(rules.rule, Posterior)
    rules.learning.next_at = float("inf")  # the thresholds below change only here
    answers = dict.fromkeys(("alpha", "beta", "gamma", "judge"), "positive")
    ids = produce(settings, *[answers] * 40)
    rules.rule.table.thresholds["sentiment"] = Threshold(0.9999, 0.95, 40.0)
    drain(fleet.workers["alpha"])
    drain(fleet.aggregator)  # trusted: every item goes on to the second tier
    rules.rule.table.thresholds.pop("sentiment")
    for name in ("beta", "gamma"):
        drain(fleet.workers[name])
        drain(fleet.aggregator)  # untrusted now: each goes on all the same
    drain(fleet.judge)
    entries = fleet.rt.redis.xrange(fleet.rt.keys.lessons)
    lessons = [Lesson.model_validate_json(f[RECORD_FIELD]) for _, f in entries]
    assert sorted(x.id for x in lessons) == sorted(ids)
    assert any(sampled(i, 0.25, salt=b"explore") for i in ids)
    assert all(x.sampling_rate is None for x in lessons), [x.id for x in lessons]
    assert all({v.worker for v in x.votes} == set(workers) for x in lessons)


def test_an_explored_item_accepted_after_trust_returns_is_audited_at_both_rates(
    make_settings: Any,
) -> None:
    """An item sent past the first tier as one of the explored sample, accepted there once the
    task is trusted again, and then audited, was seen with the chance of both samples: its
    audit weighs 1 / (explore_fraction * audit_fraction), like an audit of any acceptance
    past the first tier while the task was not trusted."""
    fleet = LearningFleet(learning_settings(make_settings, audit_fraction=0.5))
    rules = fleet.aggregator_handler
    assert isinstance(rules.rule, Posterior)
    rules.learning.next_at = float("inf")  # the thresholds below change only here
    thresholds = rules.rule.table.thresholds
    batch = [thing(random.Random(11), 300 + k) for k in range(60)]
    assert Producer(fleet.rt.redis, fleet.rt.settings).send(batch).produced == len(batch)
    thresholds.pop("things", None)  # not trusted: only the explored sample goes on
    drain(fleet.workers["student"])
    drain(fleet.aggregator)
    thresholds["things"] = Threshold(0.0, 0.95, 40.0)  # trusted: the backup's vote settles it
    drain(fleet.workers["backup"])
    drain(fleet.aggregator)
    drain(fleet.judge)
    explored = {b["id"] for b in batch if sampled(b["id"], 0.25, salt=b"explore")}
    by_workers = {d["id"] for d in fleet.outputs() if d["source"] == "workers"}
    audited = {i for i in explored & by_workers if sampled(i, 0.5)}
    assert audited, (explored, by_workers)
    entries = fleet.rt.redis.xrange(fleet.rt.keys.lessons)
    lessons = [Lesson.model_validate_json(f[RECORD_FIELD]) for _, f in entries]
    rates = {x.id: x.sampling_rate for x in lessons if x.id in by_workers}
    assert rates == dict.fromkeys(audited, 0.125), rates
