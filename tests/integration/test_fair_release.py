"""The release step of fair share (completion_queue.fair) on a real redis-server, fed by the
real producer path (``send_jobs``): which messages reach the model's queue, in what order."""

from __future__ import annotations

import itertools
import json
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from celery import Celery

from completion_queue import (
    EmbeddedRedis,
    FairQueues,
    Settings,
    create_app,
    lane_queue,
    queue_depth,
    queue_keys,
    queue_name,
    send_jobs,
    waiting,
)
from completion_queue.fair import (
    BATCH_EVERY,
    CHARGE_TTL_S,
    RATIO_JOBS,
    RATIO_WEIGHT,
    Settled,
    charge_key,
    counters_key,
    fair_share,
    held_key,
    hot_key,
)
from workers.dispatch import HAND_BACK_EVERY_S, Dispatcher

MODEL = "fair-model"
QUEUE = queue_name(MODEL)
_DB = itertools.count(3)


@dataclass
class FakeJob:
    """What ``send_jobs`` reads of a job."""

    tenant: str | None
    lane: str = "interactive"
    priority: int = 0
    max_new_tokens: int = 10
    prompt: str = ""
    id: uuid.UUID = field(default_factory=uuid.uuid4)
    model: str = MODEL

    @property
    def params(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens}


@pytest.fixture
def broker(redis_server: EmbeddedRedis) -> Iterator[tuple[Celery, redis.Redis]]:
    """A Celery app and a client on a fresh Redis database of the shared server."""
    url = f"redis://127.0.0.1:{redis_server.port}/{next(_DB) % 16}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    app = create_app(Settings(broker_url=url, model=MODEL), url)
    yield app, client
    client.flushdb()
    client.close()


def released(client: redis.Redis) -> list[str]:
    """The task ids in the model's queue, in the order a worker takes them."""
    ids = []
    for key in queue_keys(QUEUE):
        # kombu pushes on the left and pops on the right: the right end goes first.
        for payload in reversed(client.lrange(key, 0, -1)):
            ids.append(json.loads(payload)["headers"]["id"])
    return ids


def send(app: Celery, jobs: list[FakeJob]) -> dict[str, FakeJob]:
    send_jobs(app, jobs)
    return {str(job.id): job for job in jobs}


def test_backlogged_tenants_get_equal_shares_in_turn(broker: tuple[Celery, redis.Redis]) -> None:
    app, client = broker
    jobs = send(app, [FakeJob("a") for _ in range(100)] + [FakeJob("b") for _ in range(100)])
    assert FairQueues(client, QUEUE).release(20) == 20
    order = [jobs[i].tenant for i in released(client)]
    assert Counter(order) == {"a": 10, "b": 10}
    # One after the other, not a's ten first: b's first job is taken second.
    assert order[:4] in (["a", "b", "a", "b"], ["b", "a", "b", "a"])


def test_weights_share_in_proportion(broker: tuple[Celery, redis.Redis]) -> None:
    app, client = broker
    jobs = send(app, [FakeJob("a") for _ in range(100)] + [FakeJob("b") for _ in range(100)])
    fair = FairQueues(client, QUEUE)
    fair.set_weights({"a": 3.0})
    fair.release(40)
    assert Counter(jobs[i].tenant for i in released(client)) == {"a": 30, "b": 10}


def test_shares_are_counted_in_tokens_not_jobs(broker: tuple[Celery, redis.Redis]) -> None:
    app, client = broker
    jobs = send(
        app,
        [FakeJob("long", max_new_tokens=90) for _ in range(50)]
        + [FakeJob("short", max_new_tokens=10) for _ in range(50)],
    )
    FairQueues(client, QUEUE).release(40)
    counts = Counter(jobs[i].tenant for i in released(client))
    # 90 tokens a job against 10: the short tenant gets nine jobs for each long one.
    assert counts == {"short": 36, "long": 4}


def test_a_tenant_that_comes_late_starts_from_the_floor(broker: tuple[Celery, redis.Redis]) -> None:
    app, client = broker
    fair = FairQueues(client, QUEUE)
    send(app, [FakeJob("a") for _ in range(200)])
    fair.release(100)  # a alone: all of it, and a's counter runs ahead
    client.delete(*queue_keys(QUEUE))
    jobs = send(app, [FakeJob("b") for _ in range(100)])
    fair.release(20)
    order = released(client)
    # b starts from a's counter, not from zero: the two share from here on.
    assert sum(1 for i in order if i in jobs) == 10


def test_a_tenant_alone_gets_every_slot(broker: tuple[Celery, redis.Redis]) -> None:
    app, client = broker
    send(app, [FakeJob(None) for _ in range(30)])
    assert FairQueues(client, QUEUE).release(50) == 30
    assert len(released(client)) == 30
    assert waiting(client, QUEUE) == {"": 30, "interactive|": 0}


def test_interactive_goes_first_and_batch_is_never_starved(
    broker: tuple[Celery, redis.Redis],
) -> None:
    app, client = broker
    jobs = send(
        app,
        [FakeJob("a", lane="batch") for _ in range(50)]
        + [FakeJob("a", lane="interactive") for _ in range(50)],
    )
    FairQueues(client, QUEUE).release(BATCH_EVERY * 4)
    lanes = Counter(jobs[i].lane for i in released(client))
    assert lanes == {"interactive": (BATCH_EVERY - 1) * 4, "batch": 4}


def test_an_interactive_only_release_leaves_batch_lines_waiting_and_hot(
    broker: tuple[Celery, redis.Redis],
) -> None:
    # Given batch lines of two tenants and interactive calls of one
    app, client = broker
    lines = [FakeJob(tenant, lane="batch") for tenant in ("a", "b") for _ in range(20)]
    jobs = send(app, [*lines, FakeJob("a"), FakeJob("a"), FakeJob("a")])
    # When a worker releases past its hold (interactive messages only)
    moved = FairQueues(client, QUEUE).release(10, lane="interactive")
    # Then only the three calls moved; the batch lanes still wait, still marked hot
    assert moved == 3
    assert {jobs[i].lane for i in released(client)} == {"interactive"}
    assert waiting(client, QUEUE) == {"": 3, "batch|a": 20, "batch|b": 20, "interactive|a": 0}
    assert {m.decode() for m in client.smembers(hot_key(QUEUE))} == {"batch|a", "batch|b"}


def test_priorities_order_a_tenants_jobs(broker: tuple[Celery, redis.Redis]) -> None:
    app, client = broker
    jobs = send(app, [FakeJob("a", priority=0) for _ in range(5)] + [FakeJob("a", priority=9)])
    FairQueues(client, QUEUE).release(1)
    (first,) = released(client)
    assert jobs[first].priority == 9


def test_released_messages_not_yet_taken_count_against_room(
    broker: tuple[Celery, redis.Redis],
) -> None:
    app, client = broker
    send(app, [FakeJob("a") for _ in range(50)])
    fair = FairQueues(client, QUEUE)
    assert fair.release(10) == 10
    # Nothing took those ten yet: room for ten more is room for none.
    assert fair.release(10) == 0
    assert fair.release(15) == 5
    assert queue_depth(client, QUEUE) == 50  # nothing lost, nothing doubled


def test_a_settled_charge_moves_the_share(broker: tuple[Celery, redis.Redis]) -> None:
    app, client = broker
    jobs = send(app, [FakeJob("a") for _ in range(10)] + [FakeJob("b") for _ in range(10)])
    fair = FairQueues(client, QUEUE)
    fair.release(2)  # one each, 10 tokens charged to each
    # When a's job turns out to have taken nothing of its estimate
    (first_a,) = [i for i in released(client) if jobs[i].tenant == "a"]
    fair.settle([Settled(first_a, "a", took=0, prompt=0, new=10, generated=0)])
    client.delete(*queue_keys(QUEUE))
    fair.release(2)
    # Then a, below b by those 10 tokens (and not lifted: it stayed backlogged), goes twice
    assert [jobs[i].tenant for i in released(client)] == ["a", "a"]


def counters(client: redis.Redis) -> dict[str, float]:
    return {k.decode(): float(v) for k, v in client.hgetall(counters_key(QUEUE)).items()}


def test_a_job_is_settled_against_what_its_release_charged(
    broker: tuple[Celery, redis.Redis],
) -> None:
    app, client = broker
    fair = FairQueues(client, QUEUE)
    jobs = send(app, [FakeJob("a", max_new_tokens=100) for _ in range(4)])
    # Given two jobs released while the ratio was 1 (100 tokens each) and kept until settled
    fair.release(2)
    first, second = released(client)
    assert counters(client) == {"a": 200.0}
    assert client.hgetall(charge_key(QUEUE, first)) == {b"tenant": b"a", b"cost": b"100"}
    # When the first finishes having generated 20 (the ratio drops) and then the second 30
    fair.settle([Settled(first, "a", took=20, prompt=0, new=100, generated=20)])
    assert fair.new_token_ratio("a") == pytest.approx(1 + moved(1) * (0.2 - 1))
    fair.settle([Settled(second, "a", took=30, prompt=0, new=100, generated=30)])
    # Then each is charged what it took: its release's 100 given back, not the new ratio's
    assert counters(client) == pytest.approx({"a": 50.0})
    assert not client.exists(charge_key(QUEUE, first), charge_key(QUEUE, second))
    # and the next release charges a's own ratio, not 1
    fair.release(3)
    third = released(client)[-1]
    assert jobs[third].tenant == "a"
    assert float(client.hget(charge_key(QUEUE, third), "cost") or 0) == pytest.approx(
        100 * fair.new_token_ratio("a")
    )


def test_each_tenant_is_charged_by_its_own_ratio(broker: tuple[Celery, redis.Redis]) -> None:
    app, client = broker
    fair = FairQueues(client, QUEUE)
    jobs = send(app, [FakeJob("a", max_new_tokens=100) for _ in range(50)])
    jobs |= send(app, [FakeJob("b", max_new_tokens=100) for _ in range(50)])
    # Given five jobs of a's that used all 100 of their tokens and five of b's that used 10
    fair.settle(
        [Settled(str(uuid.uuid4()), "a", took=100, prompt=0, new=100, generated=100)] * 5
        + [Settled(str(uuid.uuid4()), "b", took=10, prompt=0, new=100, generated=10)] * 5
    )
    # Then each is charged at release by its own ratio, not the model's (which is between)
    fair.release(30)  # b, behind by what its jobs took less, goes first, then a too
    cost = {
        jobs[i].tenant: float(client.hget(charge_key(QUEUE, i), "cost") or 0)
        for i in released(client)
    }
    assert fair.new_token_ratio("a") == 1.0
    assert fair.new_token_ratio("b") == pytest.approx(0.1 + 0.9 * (1 - moved(5)))
    assert cost == pytest.approx({"a": 100.0, "b": 100 * fair.new_token_ratio("b")})
    assert cost["b"] < 100 * fair.new_token_ratio() < cost["a"]


def moved(jobs: int) -> float:
    """How far ``jobs`` finished jobs move a new-token ratio toward what they generated."""
    return 1 - (1 - RATIO_WEIGHT) ** (jobs / RATIO_JOBS)


def test_a_ratio_moves_as_far_whether_jobs_are_settled_together_or_one_by_one(
    broker: tuple[Celery, redis.Redis],
) -> None:
    _, client = broker
    fair = FairQueues(client, QUEUE)
    ids = [str(uuid.uuid4()) for _ in range(RATIO_JOBS)]
    # Given RATIO_JOBS jobs of tenant a that used a quarter of their tokens, settled at once
    fair.settle(Settled(i, "a", took=25, prompt=0, new=100, generated=25) for i in ids)
    # and, for another model, one by one (as a vLLM worker settles each as it ends)
    other = FairQueues(client, queue_name("other-model"))
    for i in ids:
        other.settle([Settled(i, "a", took=25, prompt=0, new=100, generated=25)])
    # Then a's ratio and the model's moved RATIO_WEIGHT of the way from 1 toward 0.25 in both
    expected = 1 + RATIO_WEIGHT * (0.25 - 1)
    for queues in (fair, other):
        assert queues.new_token_ratio("a") == pytest.approx(expected)
        assert queues.new_token_ratio() == pytest.approx(expected)


def test_a_job_cancelled_before_it_ran_gets_its_charge_back(
    broker: tuple[Celery, redis.Redis],
) -> None:
    app, client = broker
    fair = FairQueues(client, QUEUE)
    send(app, [FakeJob("a") for _ in range(2)])
    fair.release(2)
    first, second = released(client)
    # When the worker claims the first and finds it cancelled (a Settled of its id alone)
    fair.settle([Settled(first)])
    # Then a pays only for the second, and the first's charge is gone
    assert counters(client) == {"a": 10.0}
    assert not client.exists(charge_key(QUEUE, first))
    assert client.exists(charge_key(QUEUE, second))
    # and the charge of a job no release charged is nothing to give back
    fair.settle([Settled(str(uuid.uuid4()))])
    assert counters(client) == {"a": 10.0}


def test_charges_are_kept_no_longer_than_a_day(broker: tuple[Celery, redis.Redis]) -> None:
    app, client = broker
    send(app, [FakeJob("a")])
    FairQueues(client, QUEUE).release(1)
    (job,) = released(client)
    assert 0 < client.ttl(charge_key(QUEUE, job)) <= CHARGE_TTL_S == 86_400


def test_a_message_restored_to_a_drained_lane_is_found_by_the_rescan(
    broker: tuple[Celery, redis.Redis],
) -> None:
    app, client = broker
    fair = FairQueues(client, QUEUE)
    send(app, [FakeJob("a")])
    assert fair.release(10) == 1  # the lane empties and leaves the hot set
    assert client.smembers(hot_key(QUEUE)) == set()
    # When a held message comes back to its lane without a send (kombu's restore)
    (key,) = [key for key in queue_keys(QUEUE) if client.llen(key)]
    payload = client.rpop(key)
    lane = queue_keys(lane_queue(QUEUE, "a", "interactive"))[queue_keys(QUEUE).index(key)]
    client.lpush(lane, payload)
    # Then the next releases, which read only the hot lanes, do not see it
    assert fair.release(10) == 0
    # but the first once every lane is read again (at most RESCAN_S later) releases it
    client.delete(f"cq.fair.{QUEUE}.rescan")  # as if RESCAN_S had passed
    assert fair.release(10) == 1


def test_share_counts_waiting_and_held_work_and_only_ready_workers(
    broker: tuple[Celery, redis.Redis],
) -> None:
    app, client = broker
    fair = FairQueues(client, QUEUE)
    # Given 100 jobs waiting in a lane that left the hot set, and one worker holding 60
    send(app, [FakeJob("a") for _ in range(100)])
    client.delete(hot_key(QUEUE))
    assert fair.share("w1", held=60, ready=True, ttl_s=30) == (160, 1, 0)
    # When a second worker records its count while loading, then joining, then once ready
    assert fair.share("w2", held=0, ready=False, ttl_s=30) == (160, 1, 0)
    assert fair.share("w2", held=0, ready=False, joining=True, ttl_s=30) == (160, 1, 1)
    work, ready, joining = fair.share("w2", held=0, ready=True, ttl_s=30)
    # Then the work is the same, the ready workers two, the share half of it, and the lane
    # with messages is hot again, so the next release finds it
    assert (work, ready, joining) == (160, 2, 0)
    assert fair_share(work, ready, 512) == 80
    assert client.smembers(hot_key(QUEUE)) == {b"interactive|a"}
    # and a worker whose count expired, or that forgot it, no longer counts
    fair.forget("w2")
    client.hset(held_key(QUEUE), "dead", "40 1 0")
    assert fair.share("w1", held=60, ready=True, ttl_s=30) == (160, 1, 0)
    assert client.hkeys(held_key(QUEUE)) == [b"w1"]


def test_a_worker_alone_may_hold_the_whole_backlog_up_to_its_prefetch() -> None:
    assert fair_share(300, 1, 512) == 300
    assert fair_share(3000, 1, 512) == 512
    assert fair_share(257, 2, 512) == 129
    assert fair_share(10, 0, 512) == 10


def dispatcher(client: redis.Redis, node: str, held: int, **kwargs: Any) -> Dispatcher:
    return Dispatcher(client, QUEUE, target=512, held=lambda: held, node=node, **kwargs)


def test_a_joining_worker_gets_its_part_handed_back_while_it_loads(
    broker: tuple[Celery, redis.Redis],
) -> None:
    _, client = broker
    asked: list[int] = []
    # Given a worker holding a backlog of 256, that can hand back unstarted groups (static)
    first = dispatcher(client, "w1", 256, hand_back=asked.append, slack=32)
    first.step()
    # and a model whose last load took 4 s
    FairQueues(client, QUEUE).loaded(4.0)
    # When a second worker starts loading it
    joining = dispatcher(client, "w2", 0, ready=lambda: False)
    assert joining.step() == 0
    # Then the first hands back half at once, before the second is ready
    first.step()
    assert asked == [128]
    # but not once the second has loaded for three times as long (it may never load)
    joining._started -= 3 * 4.0
    joining.step()
    first._asked_at -= HAND_BACK_EVERY_S
    first.step()
    assert asked == [128]


def test_a_joining_worker_leaves_a_vllm_workers_hold_alone(
    broker: tuple[Celery, redis.Redis],
) -> None:
    _, client = broker
    limits: list[int] = []
    # Given a vLLM worker (all it holds runs: nothing to hand back) holding 256
    first = dispatcher(client, "w1", 256, limit=limits.append)
    first.step()
    FairQueues(client, QUEUE).loaded(4.0)
    # When a second worker starts loading
    dispatcher(client, "w2", 0, ready=lambda: False).step()
    # Then the first's consumer may still take its whole prefetch: the second gets its part
    # once it is ready
    first.step()
    assert limits[-1] == 512


def test_each_worker_records_how_long_its_model_took_to_load(
    broker: tuple[Celery, redis.Redis],
) -> None:
    _, client = broker
    loaded = False
    worker = dispatcher(client, "w1", 0, ready=lambda: loaded)
    worker._started -= 2.5
    worker.step()
    assert FairQueues(client, QUEUE).load_s() is None
    loaded = True
    worker.step()
    load_s = FairQueues(client, QUEUE).load_s()
    assert load_s is not None and 2.5 <= load_s < 10
