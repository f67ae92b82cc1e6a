"""Fair share of a model's workers across tenants: jobs wait per tenant and lane, and each
worker releases them to the model's queue by virtual token counter.

Every job's message is sent to its tenant's lane queue for the model
(:func:`lane_queue`: ``cq.model.gpt2|interactive|acme``), a kombu queue like any
other (its ten priority lists, ``queue_order_strategy: priority``), which no worker
consumes. Each worker's dispatcher (:mod:`workers.dispatch`) keeps the worker
holding as many messages as it did when it consumed the model's queue straight
away (the flush running and the next one forming, :func:`completion_queue.prefetch_count`):
when it holds fewer, it runs :data:`RELEASE` in Redis, which moves that many
messages from the lane queues to the model's queue (``cq.model.gpt2``), and the
worker's Celery consumer takes them from there as before. One Lua script is one
atomic step, so workers release side by side without a leader and without losing
or doubling a message (``RPOP`` then ``LPUSH`` inside it).

Which message goes next is decided as in the virtual token counter of Sheng et
al., "Fairness in Serving Large Language Models" (OSDI 2024):

- each tenant has a counter of the tokens released to it (prompt plus new tokens,
  estimated from the request: :func:`job_cost`), divided by its weight
  (``cq keys create --weight``, default 1); what each message was charged is kept
  in Redis under its job's id (:func:`charge_key`), and when the job finishes its
  tenant is charged what it really took less that (:data:`SETTLE`), so the counters
  follow the tokens served, not the estimates; a job found cancelled when its worker
  claims it is given its charge back;
- the next message is the oldest, most urgent one of the backlogged tenant with
  the lowest counter; so each backlogged tenant gets workers in proportion to its
  weight, and a tenant alone gets all of them;
- a tenant that had nothing queued has its counter lifted to the lowest counter
  among the backlogged ones when it comes back, so an idle tenant banks no credit
  (and one that posts a huge batch after the others were served is not starved of
  them either: it catches up from the same floor).

Within a tenant the interactive lane goes first (``/v1/completions``,
``/v1/chat/completions``, ``POST /v1/jobs``); batch lines (``/v1/batches``,
``cq submit --file``) get at least one release in :data:`BATCH_EVERY` while both
lanes wait, so they are never starved. Priorities order messages within a lane,
as they did within the model's queue. A worker releases interactive messages past
its hold too, up to one group more (``release(free, lane="interactive")``), so an
interactive call reaches a busy worker at once (:mod:`workers.interactive`).

A message that comes back (a dead worker's, by the visibility timeout; a
requeued flush) goes back to its lane queue, the queue it was sent to (kombu
restores by the message's routing key), and is released again by the same rules.

No Python library schedules Redis lists by deficit or virtual time (Celery's
``round_robin`` queue order cycles queues by message count, and the messages a
worker prefetches would still be served in arrival order), so this module is
our own: one Lua script and the names it shares with the producer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

#: The two lanes of a tenant: interactive calls first, batch lines never starved.
LANES = ("interactive", "batch")

#: While both lanes of a tenant wait, one release in this many goes to its batch lane.
BATCH_EVERY = 5

#: How often the release step reads every lane a model ever had, not only the hot ones.
RESCAN_S = 5

#: Characters per prompt token in the estimate of a job's cost (English text, GPT-2 BPE).
CHARS_PER_TOKEN = 4

#: The message header that carries a job's estimated prompt tokens and most new tokens
#: (see :func:`job_cost`).
COST_HEADER = "cq_cost"

#: How kombu's Redis transport names a queue's list for priority ``n`` > 0: ``queue + SEP + n``.
PRIORITY_SEPARATOR = "\x06\x16"

#: Redis priorities: kombu's Redis transport pops lower numbers first.
PRIORITY_LEVELS = 10


def lane_queue(queue: str, tenant: str | None, lane: str) -> str:
    """Return the kombu queue where ``tenant``'s jobs of ``lane`` wait for model ``queue``."""
    return f"{queue}|{lane}|{tenant or ''}"


def lanes_key(queue: str) -> str:
    """The Redis set of ``lane|tenant`` members that have ever had a job for ``queue``."""
    return f"cq.fair.{queue}.lanes"


def hot_key(queue: str) -> str:
    """The Redis set of the members of :func:`lanes_key` that may have jobs waiting now:
    the release step reads only these, and drops those it finds empty."""
    return f"cq.fair.{queue}.hot"


def counters_key(queue: str) -> str:
    """The Redis hash of each tenant's virtual token counter for ``queue``."""
    return f"cq.fair.{queue}.vtc"


def charge_key(queue: str, job_id: str) -> str:
    """The Redis hash of what job ``job_id``'s releases for ``queue`` charged its tenant:
    ``tenant`` and ``cost`` (tokens, before the weight), until the job is settled."""
    return f"cq.fair.{queue}.charge.{job_id}"


#: How long a job's charge is kept unsettled (a job released and never run, e.g. its
#: messages purged, leaves no key behind longer than this).
CHARGE_TTL_S = 86_400


def ratios_key(queue: str) -> str:
    """The Redis hash of each tenant's new-token ratio for ``queue`` (see
    :meth:`FairQueues.settle`)."""
    return f"cq.fair.{queue}.ratios"


def weights_key(queue: str) -> str:
    """The Redis hash of tenant weights the dispatchers copy from the database."""
    return f"cq.fair.{queue}.weights"


def held_key(queue: str) -> str:
    """The Redis hash of what each worker of ``queue`` holds: node -> ``"held ready until"``
    (see :data:`SHARE`)."""
    return f"cq.fair.{queue}.held"


def wake_channel(queue: str) -> str:
    """The Redis channel producers publish on after sending jobs for ``queue``."""
    return f"cq.fair.{queue}.wake"


def queue_keys(queue: str) -> list[str]:
    """Return the Redis lists that hold ``queue``'s messages, most urgent first."""
    return [queue if n == 0 else f"{queue}{PRIORITY_SEPARATOR}{n}" for n in range(PRIORITY_LEVELS)]


def job_cost(job: Any) -> tuple[int, int]:
    """Estimate a job's tokens before it runs: its prompt's (characters ÷ 4) and the most it
    may generate (``max_new_tokens`` for each of its ``n`` choices; a job that does not say
    takes the model's default, which the producer does not know: 16, OpenAI's, stands in).

    A job is charged its prompt plus its tenant's new-token ratio (the model's, for a
    tenant none of whose jobs finished yet) of the most it may generate, and settled with
    what it took when it finishes.
    """
    params: Mapping[str, Any] = getattr(job, "params", None) or {}
    messages = getattr(job, "messages", None) or []
    chars = len(getattr(job, "prompt", "") or "") + sum(
        len(str(m.get("content", ""))) for m in messages
    )
    new = int(params.get("max_new_tokens") or 16) * int(params.get("n") or 1)
    return math.ceil(chars / CHARS_PER_TOKEN), new


def lane_of_queue(name: str) -> str | None:
    """Return the lane of lane queue ``name`` (a message's routing key), or None if it is
    not a lane queue (the model's queue itself)."""
    parts = name.split("|", 2)
    return parts[1] if len(parts) == 3 and parts[1] in LANES else None


def lane_of(job: Any) -> str:
    """Return the job's lane (``interactive`` unless the job says ``batch``)."""
    lane = getattr(job, "lane", None) or "interactive"
    return lane if lane in LANES else "interactive"


def register_lanes(client: Any, queue: str, members: Iterable[str]) -> None:
    """Record ``lane|tenant`` members as having jobs for ``queue`` (idempotent); before
    their messages are sent, so every message lands in a lane that is known."""
    if members := sorted(set(members)):
        client.sadd(lanes_key(queue), *members)


def wake(client: Any, lanes: Mapping[str, Iterable[str]]) -> None:
    """Mark the ``lane|tenant`` members of each model queue hot and wake its dispatchers;
    after the messages are sent, so a release that finds a hot lane empty and drops it
    cannot come between a lane marked hot and its message landing."""
    with client.pipeline(transaction=False) as pipe:
        for queue, members in lanes.items():
            if members := sorted(set(members)):
                pipe.sadd(hot_key(queue), *members)
            pipe.publish(wake_channel(queue), "1")
        pipe.execute()


def model_queues(client: Any, queue: str) -> dict[str, str]:
    """Return the kombu queues that hold messages for model ``queue``: the model's queue
    itself (key ``""``: released, not yet taken by a worker), then each lane queue (key
    ``lane|tenant``)."""
    members = sorted(
        m.decode() if isinstance(m, bytes) else m for m in client.smembers(lanes_key(queue))
    )
    found = {"": queue}
    for member in members:
        lane, _, tenant = member.partition("|")
        found[member] = lane_queue(queue, tenant, lane)
    return found


def waiting(client: Any, queue: str) -> dict[str, int]:
    """Return how many messages wait in each of :func:`model_queues` (all priorities)."""
    found = model_queues(client, queue)
    with client.pipeline(transaction=False) as pipe:
        for name in found.values():
            for key in queue_keys(name):
                pipe.llen(key)
        counts = [int(n) for n in pipe.execute()]
    return {
        member: sum(counts[i * PRIORITY_LEVELS : (i + 1) * PRIORITY_LEVELS])
        for i, member in enumerate(found)
    }


#: Release up to ARGV[2] messages for model queue ARGV[1] (less what already waits in it).
#: Returns the number released. Keys are derived inside (one Redis, never a cluster).
RELEASE = r"""
local queue = ARGV[1]
local free = tonumber(ARGV[2])
local batch_every = tonumber(ARGV[3])
local sep = "\6\22"
local levels = 10
local lanes_key = "cq.fair." .. queue .. ".lanes"
local hot_key = "cq.fair." .. queue .. ".hot"
local rescan_key = "cq.fair." .. queue .. ".rescan"
local rescan_s = tonumber(ARGV[4])
local vtc_key = "cq.fair." .. queue .. ".vtc"
local weights_key = "cq.fair." .. queue .. ".weights"
local floor_key = "cq.fair." .. queue .. ".floor"
local turns_key = "cq.fair." .. queue .. ".turns"
local active_key = "cq.fair." .. queue .. ".active"
local ratio_key = "cq.fair." .. queue .. ".ratio"
local ratios_key = "cq.fair." .. queue .. ".ratios"
local charge_prefix = "cq.fair." .. queue .. ".charge."
local charge_ttl = tonumber(ARGV[6])
-- "interactive": release from interactive lanes only (past a worker's hold, see
-- workers.dispatch); the floor and the backlogged set are left as the last full release left them.
local only = ARGV[5] or ""

local function list_name(name, n)
  if n == 0 then return name end
  return name .. sep .. n
end

-- Released messages no worker took yet count against what the caller may release.
for n = 0, levels - 1 do
  free = free - redis.call("LLEN", list_name(queue, n))
end
if free <= 0 then return 0 end

-- The first non-empty priority list of a lane queue, or nil.
local function head(name, from)
  for n = from, levels - 1 do
    if redis.call("LLEN", list_name(name, n)) > 0 then return n end
  end
  return nil
end

-- Backlogged tenants and their lanes: tenants[t] = {interactive = {name, n}, batch = ...}.
local tenants = {}
-- Only the hot lanes are read, and those found empty leave the hot set; once every
-- RESCAN_S (one release across all workers) every lane is read again, so a message
-- that came back to a lane that had left it (kombu's restore) is found.
local members_key = hot_key
if only == "" and redis.call("SET", rescan_key, "1", "NX", "EX", rescan_s) then
  members_key = lanes_key
end
for _, member in ipairs(redis.call("SMEMBERS", members_key)) do
  local bar = string.find(member, "|", 1, true)
  local lane = string.sub(member, 1, bar - 1)
  local tenant = string.sub(member, bar + 1)
  local name = queue .. "|" .. lane .. "|" .. tenant
  -- A lane of another lane than the one asked for is not read: its hot mark stays.
  if only == "" or lane == only then
    local n = head(name, 0)
    if n ~= nil then
      tenants[tenant] = tenants[tenant] or {}
      tenants[tenant][lane] = {name = name, n = n}
      redis.call("SADD", hot_key, member)
    else
      redis.call("SREM", hot_key, member)
    end
  end
end

-- A tenant that was idle comes back at the floor: the lowest counter among the
-- tenants that were backlogged when the last release ended.
local floor = tonumber(redis.call("GET", floor_key) or "0")
local ratio = tonumber(redis.call("GET", ratio_key) or "1")
local was_active = {}
for _, tenant in ipairs(redis.call("SMEMBERS", active_key)) do was_active[tenant] = true end
local counter = {}
local weight = {}
local ratios = {}
for tenant, _ in pairs(tenants) do
  local c = tonumber(redis.call("HGET", vtc_key, tenant) or "0")
  if c < floor and not was_active[tenant] then c = floor end
  counter[tenant] = c
  weight[tenant] = tonumber(redis.call("HGET", weights_key, tenant) or "1")
  ratios[tenant] = tonumber(redis.call("HGET", ratios_key, tenant) or ratio)
end

local released = 0
while released < free do
  local best = nil
  for tenant, _ in pairs(tenants) do
    if best == nil or counter[tenant] < counter[best]
       or (counter[tenant] == counter[best] and tenant < best) then
      best = tenant
    end
  end
  if best == nil then break end
  local lanes = tenants[best]
  local lane = "interactive"
  if lanes.interactive == nil then
    lane = "batch"
  elseif lanes.batch ~= nil then
    local turn = tonumber(redis.call("HINCRBY", turns_key, best, 1))
    if turn >= batch_every then
      lane = "batch"
      redis.call("HSET", turns_key, best, 0)
    end
  end
  local at = lanes[lane]
  local payload = redis.call("RPOP", list_name(at.name, at.n))
  if payload then
    redis.call("LPUSH", list_name(queue, at.n), payload)
    released = released + 1
    local cost = 1
    local id = nil
    local ok, message = pcall(cjson.decode, payload)
    if ok and type(message) == "table" and type(message.headers) == "table" then
      local headers = message.headers
      if type(headers.cq_cost) == "table" then
        local parts = headers.cq_cost
        cost = (tonumber(parts[1]) or 0) + ratios[best] * (tonumber(parts[2]) or 0)
      end
      if type(headers.id) == "string" then id = headers.id end
    end
    counter[best] = counter[best] + cost / weight[best]
    -- Kept until the job is settled by what it took (a message released twice adds up).
    if id ~= nil then
      local key = charge_prefix .. id
      redis.call("HSET", key, "tenant", best)
      redis.call("HINCRBYFLOAT", key, "cost", cost)
      redis.call("EXPIRE", key, charge_ttl)
    end
  end
  local n = head(at.name, at.n)
  if n == nil then
    lanes[lane] = nil
    redis.call("SREM", hot_key, lane .. "|" .. best)
    if lanes.interactive == nil and lanes.batch == nil then tenants[best] = nil end
  else
    at.n = n
  end
end

local low = nil
if only ~= "" then
  for tenant, c in pairs(counter) do redis.call("HSET", vtc_key, tenant, tostring(c)) end
  return released
end
redis.call("DEL", active_key)
for tenant, c in pairs(counter) do
  redis.call("HSET", vtc_key, tenant, tostring(c))
  if tenants[tenant] ~= nil then
    redis.call("SADD", active_key, tenant)
    if low == nil or c < low then low = c end
  end
end
if low ~= nil then redis.call("SET", floor_key, tostring(low)) end
return released
"""


#: Settle finished jobs for queue ARGV[1]: six ARGV per job from ARGV[4] (see
#: :class:`Settled`). Each job's tenant (the one its release charged) is charged what the
#: job took less what it was charged (from its :func:`charge_key`, deleted here; a job
#: released before charges were kept: its estimate at today's ratio), divided by the
#: tenant's weight; each tenant's new-token ratio and the model's move toward what the
#: succeeded jobs generated of the most they could, by weight ARGV[2] for every ARGV[3]
#: of those jobs (compounded: 1 - (1 - ARGV[2]) ^ (jobs / ARGV[3])).
SETTLE = r"""
local prefix = "cq.fair." .. ARGV[1]
local step = tonumber(ARGV[2])
local per = tonumber(ARGV[3])
local function moved(old, jobs, value)
  return old + (1 - (1 - step) ^ (jobs / per)) * (value - old)
end
local model = tonumber(redis.call("GET", prefix .. ".ratio") or "1")
local function ratio_of(tenant)
  return tonumber(redis.call("HGET", prefix .. ".ratios", tenant) or model)
end
local served, generated, most, jobs = {}, {}, {}, {}
local all_generated, all_most, all_jobs = 0, 0, 0
for i = 4, #ARGV, 6 do
  local tenant = ARGV[i + 1]
  local took, prompt, new = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
  local gen = tonumber(ARGV[i + 5])
  local key = prefix .. ".charge." .. ARGV[i]
  local record = redis.call("HMGET", key, "tenant", "cost")
  local charged
  if record[2] then
    tenant = record[1] or tenant
    charged = tonumber(record[2])
    redis.call("DEL", key)
  else
    charged = prompt + ratio_of(tenant) * new
  end
  served[tenant] = (served[tenant] or 0) + took - charged
  if gen >= 0 and new > 0 then
    generated[tenant] = (generated[tenant] or 0) + gen
    most[tenant] = (most[tenant] or 0) + new
    jobs[tenant] = (jobs[tenant] or 0) + 1
    all_generated, all_most, all_jobs = all_generated + gen, all_most + new, all_jobs + 1
  end
end
for tenant, tokens in pairs(served) do
  if tokens ~= 0 then
    local weight = tonumber(redis.call("HGET", prefix .. ".weights", tenant) or "1")
    redis.call("HINCRBYFLOAT", prefix .. ".vtc", tenant, tokens / weight)
  end
end
for tenant, new in pairs(most) do
  local ratio = moved(ratio_of(tenant), jobs[tenant], generated[tenant] / new)
  redis.call("HSET", prefix .. ".ratios", tenant, tostring(ratio))
end
if all_most > 0 then
  redis.call("SET", prefix .. ".ratio", tostring(moved(model, all_jobs, all_generated / all_most)))
end
return #ARGV
"""

#: How far :data:`RATIO_JOBS` finished jobs move a new-token ratio (fewer or more jobs,
#: compounded), so a ratio follows the last few hundred jobs whether a worker settles them
#: a group at a time (the static engine's groups of 32) or one by one (vLLM).
RATIO_WEIGHT = 0.2

#: See :data:`RATIO_WEIGHT`.
RATIO_JOBS = 32


class Settled(NamedTuple):
    """One job to settle (:meth:`FairQueues.settle`): its id and tenant, the tokens it took
    (prompt plus generated), its estimate (:func:`job_cost`) for a job whose charge was not
    kept, and the new tokens it generated (-1: it did not succeed, and moves no ratio).
    A job found cancelled at its claim: its id alone (its charge is given back)."""

    id: str
    tenant: str = ""
    took: int = 0
    prompt: int = 0
    new: int = 0
    generated: int = -1


def ratio_key(queue: str) -> str:
    """The Redis string with ``queue``'s new-token ratio (see :meth:`FairQueues.settle`)."""
    return f"cq.fair.{queue}.ratio"


#: Record that worker ARGV[2] holds ARGV[3] messages (ARGV[4]: "1" once its model is loaded,
#: "2" while it loads and is expected ready soon, "0" else) for the next ARGV[5] seconds;
#: return the model's work (what waits in its queue and its lane queues, plus what every
#: worker holds), how many workers are ready, and how many are joining ("2").
SHARE = r"""
local queue = ARGV[1]
local key = "cq.fair." .. queue .. ".held"
local sep = "\6\22"
local levels = 10
local clock = redis.call("TIME")
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
redis.call("HSET", key, ARGV[2], ARGV[3] .. " " .. ARGV[4] .. " " .. (now + tonumber(ARGV[5])))
local work, ready, joining = 0, 0, 0
local entries = redis.call("HGETALL", key)
for i = 1, #entries, 2 do
  local held, loaded, till = string.match(entries[i + 1], "^(%S+) (%S+) (%S+)$")
  if held == nil or tonumber(till) < now then
    redis.call("HDEL", key, entries[i])
  else
    work = work + tonumber(held)
    if loaded == "1" then ready = ready + 1 end
    if loaded == "2" then joining = joining + 1 end
  end
end
local function waiting(name)
  local count = 0
  for n = 0, levels - 1 do
    local list = name
    if n > 0 then list = name .. sep .. n end
    count = count + redis.call("LLEN", list)
  end
  return count
end
work = work + waiting(queue)
-- Every lane, not only the hot ones: a handed-back message may land in a lane that left
-- the hot set; such a lane is marked hot again, so the release that follows finds it.
for _, member in ipairs(redis.call("SMEMBERS", "cq.fair." .. queue .. ".lanes")) do
  local bar = string.find(member, "|", 1, true)
  local count = waiting(queue .. "|" .. string.sub(member, 1, bar - 1) .. "|"
    .. string.sub(member, bar + 1))
  if count > 0 then redis.call("SADD", "cq.fair." .. queue .. ".hot", member) end
  work = work + count
end
return {work, ready, joining}
"""


def load_key(queue: str) -> str:
    """The Redis string with how long the last worker of ``queue`` took to load its model,
    from its dispatcher's start to ready, in seconds (see :meth:`FairQueues.loaded`)."""
    return f"cq.fair.{queue}.load_s"


#: How long a model's load time is remembered (a cluster that was down a day measures anew).
LOAD_TTL_S = 86_400


class Share(NamedTuple):
    """What the share step read: the model's work, its ready workers, and its joining ones
    (loading, and expected ready soon)."""

    work: int
    ready: int
    joining: int


def fair_share(work: int, ready: int, most: int) -> int:
    """What one worker may hold: an equal part of the model's ``work`` among its ``ready``
    workers (rounded up), at most ``most`` (its prefetch). A worker alone: all of it."""
    return min(most, math.ceil(work / max(ready, 1)))


class FairQueues:
    """The release step for one model's queue, bound to one Redis client."""

    def __init__(self, client: Any, queue: str) -> None:
        self.client = client
        self.queue = queue
        self._release = client.register_script(RELEASE)
        self._settle = client.register_script(SETTLE)
        self._share = client.register_script(SHARE)

    def release(self, free: int, *, lane: str = "") -> int:
        """Move up to ``free`` messages (less those already waiting in the model's queue)
        from the lane queues to the model's queue, fairly; return how many moved.

        ``lane``: from that lane's queues only (``interactive``: past a worker's hold).
        """
        if free <= 0:
            return 0
        return int(
            self._release(args=[self.queue, free, BATCH_EVERY, RESCAN_S, lane, CHARGE_TTL_S])
        )

    def share(
        self, node: str, *, held: int, ready: bool, ttl_s: float, joining: bool = False
    ) -> Share:
        """Record that worker ``node`` holds ``held`` messages, and whether its model is
        loaded (or, ``joining``, loads and is expected ready soon), for ``ttl_s`` seconds;
        return the model's work, its ready workers and its joining ones."""
        flag = 1 if ready else 2 if joining else 0
        work, workers, joiners = self._share(args=[self.queue, node, held, flag, ttl_s])
        return Share(int(work), int(workers), int(joiners))

    def loaded(self, seconds: float) -> None:
        """Record that a worker of this model took ``seconds`` to load it."""
        self.client.set(load_key(self.queue), repr(round(seconds, 3)), ex=LOAD_TTL_S)

    def load_s(self) -> float | None:
        """How long the last worker of this model took to load it; None: none recorded."""
        value = self.client.get(load_key(self.queue))
        return float(value) if value is not None else None

    def forget(self, node: str) -> None:
        """Forget what worker ``node`` held (it stops releasing)."""
        self.client.hdel(held_key(self.queue), node)

    def new_token_ratio(self, tenant: str | None = None) -> float:
        """The share of the most they may generate that this model's jobs (``tenant``'s)
        generate: a moving average over finished jobs (:data:`RATIO_WEIGHT`); 1 until one
        finished (the model's, for a tenant none of whose jobs finished)."""
        model, tenants = self.new_token_ratios()
        return model if tenant is None else tenants.get(tenant, model)

    def new_token_ratios(self) -> tuple[float, dict[str, float]]:
        """The model's new-token ratio and each tenant's that has one (see
        :meth:`new_token_ratio`), in one round trip."""
        with self.client.pipeline(transaction=False) as pipe:
            pipe.get(ratio_key(self.queue))
            pipe.hgetall(ratios_key(self.queue))
            model, tenants = pipe.execute()
        return float(model or 1.0), {
            (k.decode() if isinstance(k, bytes) else k): float(v) for k, v in tenants.items()
        }

    def settle(self, jobs: Iterable[Settled]) -> None:
        """Charge each job's tenant what the job took less what its releases charged (a
        job cancelled before it ran took nothing: its charge is given back), and move the
        new-token ratios by what the succeeded jobs generated (:data:`SETTLE`)."""
        args: list[Any] = [self.queue, RATIO_WEIGHT, RATIO_JOBS]
        for job in jobs:
            args.extend(job)
        if len(args) > 3:
            self._settle(args=args)

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Replace the tenants' weights the release step reads (missing: 1)."""
        key = weights_key(self.queue)
        with self.client.pipeline() as pipe:
            pipe.delete(key)
            if weights:
                pipe.hset(key, mapping={name: repr(float(w)) for name, w in weights.items()})
            pipe.execute()
