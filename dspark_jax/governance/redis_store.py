"""Governance state shared by server replicas in Redis: one quota ledger and one rollback state for all.

Keys (`<p>` = store.key_prefix; the `{...}` hash tags keep what one script touches in one Redis Cluster slot):
    <p>:quota:{<tenant>}:res                 hash    reservation id -> reserved tokens "a1,a2,..." (one per rule)
    <p>:quota:{<tenant>}:lease               zset    reservation id -> lease expiry (clock seconds)
    <p>:quota:{<tenant>}:over                hash    rule number -> all-time overshoot tokens
    <p>:quota:{<tenant>}:done:<id>           string  settlement marker (a retried settlement charges once)
    <p>:quota:{<tenant>}:<i>:<win_ms>:<start_ms>  string  tokens charged to rule i's window; expires with the window
    <p>:rollback:{<p>}:<class>               hash    state, epoch, since, probation_until
    <p>:rollback:{<p>}:switches              list    JSON switch events, oldest first (the last 1000)

Reservation and settlement are Lua scripts (atomic). A reservation holds a lease: the replica renews the leases of
its in-flight requests every lease_s / 3 (a background thread), and any replica's next script drops reservations
whose lease ran out, so a replica that dies mid-request gives its tokens back after at most lease_s. Clocks: lease
expiries and window starts are the replicas' wall clocks (`time.time`): keep them in sync (NTP).

A settlement that cannot reach Redis is kept and retried (the heartbeat) until it lands; an admission that cannot
follows the policy's `store.on_error`. redis-py reconnects by itself; while Redis is away calls fail fast and are
retried after StoreHealth.retry_s.
"""
from __future__ import annotations

import dataclasses
import json
import math
import threading
import uuid
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import redis

from dspark_jax.governance.policy import QuotaRule, StoreSettings
from dspark_jax.governance.quotas import quota_exceeded
from dspark_jax.governance.store import (ClassState, GovernanceStore, StoreHealth, StoreUnavailable, SwitchEvent,
                                         event_from_dict)

MAX_EVENTS = 1000
SETTLED_TTL_MS = 24 * 3600 * 1000

_LUA_COMMON = """
local function purge(res, lease, now)
  local gone = redis.call('ZRANGEBYSCORE', lease, '-inf', now)
  for _, id in ipairs(gone) do redis.call('HDEL', res, id) end
  if #gone > 0 then redis.call('ZREMRANGEBYSCORE', lease, '-inf', now) end
end
local function split(csv, n)
  local out = {}
  for i = 1, n do out[i] = 0 end
  if csv then
    local i = 1
    for a in string.gmatch(csv, '[^,]+') do out[i] = tonumber(a); i = i + 1 end
  end
  return out
end
local function reserved(res, n)
  local sums = split(nil, n)
  for _, csv in ipairs(redis.call('HVALS', res)) do
    local held = split(csv, n)
    for i = 1, n do sums[i] = sums[i] + held[i] end
  end
  return sums
end
"""

# KEYS: res, lease, window_1..n.  ARGV: id, now, lease_until, "a1,..", then limit_i, need_i per rule.
# Returns {0} reserved, {-1} id already reserved, {i, charged, reserved} rule i refused it.
_RESERVE = _LUA_COMMON + """
purge(KEYS[1], KEYS[2], ARGV[2])
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return {-1} end
local n = #KEYS - 2
local sums = reserved(KEYS[1], n)
for i = 1, n do
  local charged = tonumber(redis.call('GET', KEYS[2 + i]) or '0')
  if charged + sums[i] + tonumber(ARGV[4 + 2 * i]) > tonumber(ARGV[3 + 2 * i]) then return {i, charged, sums[i]} end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return {0}
"""

# KEYS: res, lease, over, done, window_1..n.  ARGV: id, done_ttl_ms, then actual_i, window_ttl_ms_i per rule.
# Drops the reservation and charges the actual tokens; returns 1, or 0 when this id was settled before.
_SETTLE = _LUA_COMMON + """
if redis.call('SET', KEYS[4], '1', 'NX', 'PX', ARGV[2]) == false then return 0 end
local n = #KEYS - 4
local held = split(redis.call('HGET', KEYS[1], ARGV[1]) or nil, n)
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
for i = 1, n do
  local actual = tonumber(ARGV[1 + 2 * i])
  redis.call('INCRBY', KEYS[4 + i], actual)
  redis.call('PEXPIRE', KEYS[4 + i], ARGV[2 + 2 * i])
  if actual > held[i] then redis.call('HINCRBY', KEYS[3], i, actual - held[i]) end
end
return 1
"""

# KEYS: res, lease, over, window_1..n.  ARGV: now.  Returns charged_i, reserved_i, overshoot_i per rule.
_USAGE = _LUA_COMMON + """
purge(KEYS[1], KEYS[2], ARGV[1])
local n = #KEYS - 3
local sums = reserved(KEYS[1], n)
local out = {}
for i = 1, n do
  out[#out + 1] = tonumber(redis.call('GET', KEYS[3 + i]) or '0')
  out[#out + 1] = sums[i]
  out[#out + 1] = tonumber(redis.call('HGET', KEYS[3], i) or '0')
end
return out
"""

# KEYS: state hash, switch log.  ARGV: expected epoch, state, epoch, since, probation_until ('' = none),
# event JSON, max events.  Returns {1} applied, or {0, field, value, ...} the current state.
_SWITCH = """
local epoch = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
if epoch ~= tonumber(ARGV[1]) then
  local out = {0}
  for _, v in ipairs(redis.call('HGETALL', KEYS[1])) do out[#out + 1] = v end
  return out
end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'epoch', ARGV[3], 'since', ARGV[4], 'probation_until', ARGV[5])
redis.call('RPUSH', KEYS[2], ARGV[6])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[7]), -1)
return {1}
"""


class RedisCalls:
    """A redis client whose failures to connect become StoreUnavailable, counted in `health`; while Redis is
    away, calls fail fast until health.retry_s has passed (then the next call reconnects)."""

    def __init__(self, client: redis.Redis, health: StoreHealth):
        self.client, self.health = client, health

    def __call__(self, operation: str, fn: Callable, *args, **kwargs):
        self.health.check(operation)
        try:
            result = fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise self.health.failed(operation, e) from None
        self.health.ok()
        return result


@dataclass(frozen=True)
class _Settlement:
    tenant: str
    reservation: str
    prompt_tokens: int
    output_tokens: int
    now: float


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))


class RedisQuotaLedger:
    """quotas.QuotaLedger's interface, in Redis: every replica with the same policy and key prefix shares it."""

    def __init__(self, calls: RedisCalls, quotas: Mapping[str, Sequence[QuotaRule]], prefix: str, lease_s: float,
                 clock: Callable[[], float]):
        self._calls, self._prefix, self.lease_s, self._clock = calls, prefix, lease_s, clock
        self._rules = {tenant: tuple(rules) for tenant, rules in quotas.items() if rules}
        self._replica = uuid.uuid4().hex[:12]  # reservation ids are '<replica>:<request id>': unique across replicas
        self._lock = threading.Lock()
        self._local: dict[str, tuple[str, str]] = {}  # request id -> (tenant, reservation id), in flight here
        self._pending: list[_Settlement] = []  # settlements that could not reach Redis yet
        client = calls.client
        self._reserve, self._settle, self._usage = (client.register_script(s) for s in (_RESERVE, _SETTLE, _USAGE))
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    # -- keys ----------------------------------------------------------------------------------------------------
    def _base(self, tenant: str) -> str:
        return f"{self._prefix}:quota:{{{tenant}}}"

    def _window(self, tenant: str, i: int, rule: QuotaRule, now: float) -> tuple[str, float]:
        """Rule i's window key at `now`, and the window's start."""
        start = math.floor(now / rule.window_s) * rule.window_s
        return f"{self._base(tenant)}:{i}:{_ms(rule.window_s)}:{_ms(start)}", start

    @staticmethod
    def _amount(rule: QuotaRule, prompt_tokens: int, output_tokens: int) -> int:
        return output_tokens + (prompt_tokens if rule.count == "total" else 0)

    # -- the ledger interface ------------------------------------------------------------------------------------
    def reserve(self, request_id: str, tenant: str, prompt_tokens: int, max_new_tokens: int, now: float) -> None:
        """As QuotaLedger.reserve; raises StoreUnavailable when Redis cannot be reached (nothing reserved)."""
        with self._lock:
            if request_id in self._local:
                raise ValueError(f"request {request_id!r} already holds a quota reservation")
        rules = self._rules.get(tenant)
        if not rules:
            return
        self._settle_pending()
        needs = [self._amount(rule, prompt_tokens, max_new_tokens) for rule in rules]
        windows = [self._window(tenant, i, rule, now) for i, rule in enumerate(rules, 1)]
        reservation = f"{self._replica}:{request_id}"
        args = [reservation, repr(now), repr(now + self.lease_s), ",".join(map(str, needs))]
        for rule, need in zip(rules, needs):
            args += [rule.tokens, need]
        base = self._base(tenant)
        reply = self._calls("reserve", self._reserve, keys=[f"{base}:res", f"{base}:lease"] + [k for k, _ in windows],
                            args=args)
        if reply[0] == -1:
            raise ValueError(f"request {request_id!r} already holds a quota reservation")
        if reply[0] > 0:
            i = reply[0] - 1
            start = windows[i][1]
            raise quota_exceeded(tenant, rules[i], int(reply[1]), int(reply[2]), needs[i],
                                 start + rules[i].window_s - now)
        with self._lock:
            self._local[request_id] = (tenant, reservation)

    def admit_unreserved(self, request_id: str, tenant: str) -> None:
        """A request admitted while Redis was away (on_error: allow): charged at reconcile, as overshoot."""
        if self._rules.get(tenant):
            with self._lock:
                self._local[request_id] = (tenant, f"{self._replica}:{request_id}")

    def reconcile(self, request_id: str, prompt_tokens: int, output_tokens: int, now: float) -> None:
        """As QuotaLedger.reconcile. Never raises for an unreachable Redis: the settlement waits and is retried."""
        with self._lock:
            entry = self._local.pop(request_id, None)
        if entry is None:
            return
        settlement = _Settlement(entry[0], entry[1], prompt_tokens, output_tokens, now)
        try:
            self._apply(settlement)
        except StoreUnavailable:
            with self._lock:
                self._pending.append(settlement)

    def snapshot(self, now: float) -> dict[str, list[dict]]:
        """As QuotaLedger.snapshot (usage of every replica); raises StoreUnavailable."""
        self._settle_pending()
        out = {}
        for tenant, rules in self._rules.items():
            windows = [self._window(tenant, i, rule, now) for i, rule in enumerate(rules, 1)]
            base = self._base(tenant)
            flat = self._calls("snapshot", self._usage, keys=[f"{base}:res", f"{base}:lease", f"{base}:over"]
                               + [k for k, _ in windows], args=[repr(now)])
            rows = []
            for j, (rule, (_, start)) in enumerate(zip(rules, windows)):
                used, reserved, over = (int(v) for v in flat[3 * j:3 * j + 3])
                rows.append(dict(tokens=rule.tokens, window_s=rule.window_s, count=rule.count, window_start=start,
                                 used=used, reserved=reserved, remaining=max(0, rule.tokens - used - reserved),
                                 overshoot_total=over))
            out[tenant] = rows
        return out

    # -- settlement and leases -----------------------------------------------------------------------------------
    def _apply(self, s: _Settlement) -> None:
        rules = self._rules[s.tenant]
        base = self._base(s.tenant)
        keys = [f"{base}:res", f"{base}:lease", f"{base}:over", f"{base}:done:{s.reservation}"]
        args: list = [s.reservation, SETTLED_TTL_MS]
        clock_now = max(s.now, self._clock())
        for i, rule in enumerate(rules, 1):
            key, start = self._window(s.tenant, i, rule, s.now)
            keys.append(key)
            args += [self._amount(rule, s.prompt_tokens, s.output_tokens),
                     max(1, _ms(start + rule.window_s - clock_now) + 1000)]
        self._calls("settle", self._settle, keys=keys, args=args)

    def _settle_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for i, settlement in enumerate(pending):
            try:
                self._apply(settlement)
            except StoreUnavailable:
                with self._lock:
                    self._pending[:0] = pending[i:]
                return

    @property
    def pending(self) -> int:
        """Settlements waiting for Redis."""
        with self._lock:
            return len(self._pending)

    def renew_leases(self, now: float | None = None) -> None:
        """Extends the leases of this replica's in-flight reservations to now + lease_s (only those still
        held: a reservation already given back stays given back)."""
        now = self._clock() if now is None else now
        with self._lock:
            local = list(self._local.values())
        if not local:
            return
        pipe = self._calls.client.pipeline(transaction=False)
        for tenant, reservation in local:
            pipe.zadd(f"{self._base(tenant)}:lease", {reservation: now + self.lease_s}, xx=True)
        self._calls("renew", pipe.execute)

    def start_heartbeat(self, interval_s: float | None = None) -> None:
        """A daemon thread renewing leases and retrying settlements every interval (default lease_s / 3)."""
        interval = self.lease_s / 3 if interval_s is None else interval_s

        def beat():
            while not self._stop.wait(interval):
                try:
                    self._settle_pending()
                    self.renew_leases()
                except StoreUnavailable:
                    pass  # counted; retried at the next beat

        self._heartbeat = threading.Thread(target=beat, name="dspark-quota-heartbeat", daemon=True)
        self._heartbeat.start()

    def close(self) -> None:
        """Stops the heartbeat and tries once more to land waiting settlements."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        try:
            self._settle_pending()
        except StoreUnavailable:
            pass


class RedisRollbackStates:
    """store.RollbackStates in Redis: one state per class for every replica, switches by compare-and-set."""

    def __init__(self, calls: RedisCalls, prefix: str, max_events: int = MAX_EVENTS):
        self._calls, self._max_events = calls, max_events
        self._base = f"{prefix}:rollback:{{{prefix}}}"
        self._switch = calls.client.register_script(_SWITCH)

    def load(self, workload_class: str) -> ClassState:
        return _class_state(self._calls("rollback_load", self._calls.client.hgetall, f"{self._base}:{workload_class}"))

    def switch(self, expected_epoch: int, new: ClassState, event: SwitchEvent) -> tuple[bool, ClassState]:
        until = "" if new.probation_until is None else repr(new.probation_until)
        reply = self._calls("rollback_switch", self._switch,
                            keys=[f"{self._base}:{event.workload_class}", f"{self._base}:switches"],
                            args=[expected_epoch, new.state, new.epoch, repr(new.since), until,
                                  json.dumps(dataclasses.asdict(event)), self._max_events])
        if reply[0] == 1:
            return True, new
        return False, _class_state(dict(zip(reply[1::2], reply[2::2])))

    def events(self) -> list[SwitchEvent]:
        raw = self._calls("rollback_events", self._calls.client.lrange, f"{self._base}:switches", 0, -1)
        return [event_from_dict(json.loads(item)) for item in raw]


def _class_state(fields: Mapping[str, str]) -> ClassState:
    if not fields:
        return ClassState()
    until = fields.get("probation_until") or None
    return ClassState(state=fields["state"], epoch=int(fields["epoch"]), since=float(fields["since"]),
                      probation_until=None if until is None else float(until))


def connect(url: str, timeout_s: float = 0.5) -> redis.Redis:
    """A client for `url` (text replies); short timeouts so an outage costs admission little time."""
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                decode_responses=True)


def open_redis_store(settings: StoreSettings, quotas: Mapping[str, Sequence[QuotaRule]],
                     clock: Callable[[], float], heartbeat: bool = True) -> GovernanceStore:
    """A GovernanceStore in the Redis at settings.url (connected lazily), its lease heartbeat running."""
    health = StoreHealth()
    calls = RedisCalls(connect(settings.url), health)
    ledger = RedisQuotaLedger(calls, quotas, settings.key_prefix, settings.lease_s, clock)
    if heartbeat:
        ledger.start_heartbeat()

    def close():
        ledger.close()
        calls.client.close()

    return GovernanceStore(settings, ledger, RedisRollbackStates(calls, settings.key_prefix), health, close)
