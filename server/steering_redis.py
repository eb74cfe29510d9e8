"""A steering store on a Redis server, shared by every replica (`--steering-store redis://...`).

Keys (one Redis database; ids carry the model's key, so several models can share it):

    tiller:steering:vec:<id>   the vector's .npz bytes, exactly as the directory store's file
    tiller:steering:index      hash <id> -> its nbytes: what exists, and what it weighs
    tiller:steering:used       the sum of the index's nbytes, for the size bound

Writes and deletes are Lua scripts, so each is one atomic step on the server: a put checks the
id (SET NX semantics: ids are content addresses, a second write of one is a no-op), checks the
bound against `used` and writes all three keys, and concurrent writers on any number of replicas
can never take the store past its bound.

Reads are cached here, decoded: an id names its bytes forever, so a cached vector is never
stale -- but it can be deleted on another replica. A cached get therefore asks Redis only
HEXISTS (a few bytes each way) before answering, so a delete anywhere is seen at once; a time to
live would instead keep steering with a deleted vector, or building it again, for that long.

A Redis that is down or refuses a command raises StoreUnavailable (the service answers 503);
nothing connects at start, so the server starts and serves everything else without it.
Connections that broke while Redis restarted are retried once on a fresh connection.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .steering_store import (
    DamagedEntry,
    SteeringVector,
    StoreFull,
    StoreUnavailable,
    decode,
    encode,
    full_message,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

PREFIX = "tiller:steering:"
VEC = PREFIX + "vec:"
INDEX = PREFIX + "index"
USED = PREFIX + "used"
CONNECT_TIMEOUT = 1.0  # seconds: a Redis that is down is a prompt 503, not a hung request
COMMAND_TIMEOUT = 3.0

# KEYS: vec:<id>, index, used; ARGV: id, bytes, nbytes, max_bytes.
# Returns {0, used}: already stored; {-1, used}: full; {1, used}: stored.
_PUT = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
  return {0, tonumber(redis.call('GET', KEYS[3]) or '0')}
end
local used = tonumber(redis.call('GET', KEYS[3]) or '0')
local need = tonumber(ARGV[3])
if used + need > tonumber(ARGV[4]) then return {-1, used} end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], need)
return {1, redis.call('INCRBY', KEYS[3], need)}
"""
# KEYS: vec:<id>, index, used; ARGV: id. Returns 1 when it was there.
_DELETE = """
local need = redis.call('HGET', KEYS[2], ARGV[1])
if not need then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[1])
redis.call('DECRBY', KEYS[3], need)
return 1
"""


class RedisStore:
    def __init__(self, client: redis.Redis, max_bytes: int, name: str) -> None:
        self.max_bytes = max_bytes
        self.name = name
        self._redis = client
        self._put = client.register_script(_PUT)
        self._delete = client.register_script(_DELETE)
        self._cache: dict[str, SteeringVector] = {}
        self._damaged: set[str] = set()  # keys
        self._lock = threading.Lock()  # the cache and the damaged set, across worker threads

    @classmethod
    def from_url(cls, url: str, max_bytes: int) -> RedisStore:
        """`redis://[:password@]host:port/db` (also rediss://, unix://); ValueError if not."""
        client = redis.Redis.from_url(
            url, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=COMMAND_TIMEOUT,
            retry=Retry(NoBackoff(), 1, (redis.ConnectionError,)))
        kw = client.connection_pool.connection_kwargs
        if kw.get("decode_responses"):  # NOTE: a URL's query can set it; vectors are bytes
            raise ValueError("decode_responses cannot be used: vectors are stored as bytes")
        where = kw.get("path") or f"{kw.get('host')}:{kw.get('port')}"
        return cls(client, max_bytes, f"redis {where} db {kw.get('db', 0)}")

    def __str__(self) -> str:
        return self.name

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as e:
            raise StoreUnavailable(f"the steering store ({self.name}) is unavailable: "
                                   f"{type(e).__name__}: {e}") from e

    def _decode(self, vector_id: str, data: bytes | str) -> SteeringVector | None:
        assert isinstance(data, bytes)  # from_url refuses decode_responses
        try:
            vec = decode(data, vector_id)
        except DamagedEntry as e:
            with self._lock:
                if VEC + vector_id not in self._damaged:
                    log.error("steering store: skipping damaged entry %s%s in %s: %s", VEC,
                              vector_id, self.name, e)
                self._damaged.add(VEC + vector_id)
            return None
        with self._lock:
            self._damaged.discard(VEC + vector_id)
            self._cache[vector_id] = vec
        return vec

    @property
    def used_bytes(self) -> int:
        return int(self._call(self._redis.get, USED) or 0)

    @property
    def damaged_entries(self) -> int:
        return len(self._damaged)

    def get(self, vector_id: str) -> SteeringVector | None:
        cached = self._cache.get(vector_id)
        if cached is not None:
            if self._call(self._redis.hexists, INDEX, vector_id):
                return cached
            with self._lock:
                self._cache.pop(vector_id, None)  # deleted, here or on another replica
            return None
        data = self._call(self._redis.get, VEC + vector_id)
        return None if data is None else self._decode(vector_id, data)

    def list(self, model_key: str | None = None) -> list[SteeringVector]:
        ids = {i.decode() if isinstance(i, bytes) else i
               for i in self._call(self._redis.hkeys, INDEX)}
        with self._lock:
            for gone in self._cache.keys() - ids:
                del self._cache[gone]
        missing = sorted(ids - self._cache.keys())
        if missing:
            for vid, data in zip(missing, self._call(self._redis.mget,
                                                     [VEC + i for i in missing]), strict=True):
                if data is not None:  # None: deleted between the two reads
                    self._decode(vid, data)
        with self._lock:
            vectors = [self._cache[i] for i in ids if i in self._cache]
        return sorted((v for v in vectors if model_key is None or v.model_key == model_key),
                      key=lambda v: (v.created, v.id))

    def put(self, vec: SteeringVector) -> SteeringVector:
        status, used = self._call(self._put, keys=[VEC + vec.id, INDEX, USED],
                                  args=[vec.id, encode(vec), vec.nbytes, self.max_bytes])
        if status == -1:
            raise StoreFull(full_message(int(used), self.max_bytes, vec.nbytes))
        if status == 0:  # already there (its own `created`): that one is the vector
            return self.get(vec.id) or vec
        with self._lock:
            self._cache[vec.id] = vec
        return vec

    def delete(self, vector_id: str) -> bool:
        with self._lock:
            self._cache.pop(vector_id, None)
        return bool(self._call(self._delete, keys=[VEC + vector_id, INDEX, USED],
                               args=[vector_id]))
