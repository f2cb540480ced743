"""The coherence protocol — stated once, here (docs/COHERENCE.md repeats it with the measurements).

**The promise.** After a write, event, revocation or invalidation is answered 2xx, no instance serves the old
value — nor anything derived from it (a conversion from a rate) — later than ``B`` (``coherence.bound``, 100 ms)
after the answer. A write whose invalidation cannot be made certain answers 503 and changes nothing. A read that
*started* before that moment may return either value (it overlapped the write).

**Parts.** The engine (:class:`tiers.coherence.engine.Coherence`, built once by the composition root and passed to
every actor) owns all of it: the shared tier's scripts (:class:`tiers.coherence.store.Store`, on Redis in
:mod:`tiers.coherence.redis_store`), the bus subscriber, the L1's trust lease and epochs (:mod:`tiers.l1`), the
incarnation fence and the outbox (:mod:`tiers.coherence.outbox`).

**State in Redis**, per source key ``S`` (a value loaded from an origin) and derived key ``D`` (computed from
sources: a conversion ``D`` from its rate ``S``):

=====================  ==========================================================================================
``S``, ``D``           the value; its header carries the incarnation and the sources' generations it was made under
``S|g``                generation of ``S``: only grows (``max(g+1, Redis µs)``); bumped by every invalidation of ``S``;
                       created by the first fill of ``S`` with the value's own lifetime, so a stored value never
                       carries 0 and a missing ``S|g`` always means "invalid"
``S|w``                write fences: tokens scored by expiry; while one is live nothing guarded by ``S`` is filled
``S|pre``              the value a fenced write moved aside: never served; deleted at commit; put back (under the
                       current generation) when the write fails, unless another writer still fences ``S`` or ``S``
                       was refilled
``S|lease``, ``D|lease``  load lease: one origin load per key across the fleet (efficiency only, not safety)
``<channel>|seq``      message counter; every message is published as ``<seq>|<json>`` by the script that counts it
=====================  ==========================================================================================

Postgres: ``cache_outbox(id, keys, created_at)``, one row per write, in the same statement as the write.

**Messages** on the channel (``REDIS_CHANNEL``): ``<seq>|{"i": <sender bus id>, "k": [keys], "p": [patterns],
"traceparent"?: …}``. Subscribers also send ``PING <n>`` on their own subscriber connection; Redis answers it in
band, after every message it had already queued for that connection.

**Rules.**

1. *Fill guard.* A load records the generations of its sources before it reads (``acquire``: one script that
   answers a fresh value, or the lease, or "fenced", plus the current generations). A value reaches Redis only
   through ``fill``, which installs it iff no source is fenced and every source's generation is still the recorded
   one. A derived value carries the generations of the source *values it was computed from* (from their envelope
   or L1 entry), never generations read later. A stored derived value is served only while those generations are
   current (checked on every Redis read), so invalidating a rate invalidates all its conversions in O(1) and no
   index of derived keys exists. In L1 the same holds through tickets: an entry is installed only if neither its
   key nor its sources were invalidated (nor the epoch changed) since the ticket was taken before the fetch, and a
   derived entry is re-checked against its sources on every hit.
2. *Writes: fence, then commit.* ``Coherence.write`` first runs one script per write: fence every key, bump its
   generation, delete its value and lease, publish. Only then is the write committed to Postgres (with its outbox
   row). So from before the commit until the fence is lifted (after the commit) nothing can be filled for those
   keys, and every load that began before carries an old generation. If the script fails the write is not
   committed: 503, nothing changed. Events (no row changes) run the same script without a fence. Lifting the fence
   answers whether it held throughout; if Redis lost it (a restart, an older snapshot, a failover: the
   incarnation changed or the token is gone) or cannot be asked, the writer runs the invalidation again, unfenced,
   before it answers; if that fails too it answers 503 ``invalidation-pending`` (committed; rule 3 finishes it).
3. *Outbox.* A writer that learns its commit succeeded deletes its row. A row older than ``outbox_grace`` belongs to
   a commit nobody answered for (a statement that timed out on the client and committed later, a writer that died):
   any instance applies it (rule 2's script, no fence) and deletes it in one transaction.
4. *L1 trust lease.* Let ``W = join_window`` (25 ms) and ``L = B - W``. L1 serves an entry past ``L`` after its
   fetch only while ``trusted_until`` (monotonic) is in the future. The subscriber sends ``PING`` every
   ``ping_interval``; a pong for a ping sent at ``t`` proves every message published before ``t`` was received and
   applied (messages are applied in order, synchronously), so it renews the lease to ``t + L``. A connection that
   goes silent stops renewing it: L1 then serves only source entries fetched within the last ``L`` (never a derived
   one) — whatever the failure, never longer than ``L`` after a write it missed. *Joining.* A reader that finds a
   load in flight for its key joins it (no Redis call) and takes its value if Redis accepted that value's fill
   (then no source was invalidated or fenced between the load's ``acquire`` and its fill) or if the load began at
   most ``W`` before the reader arrived; otherwise it reads again alone. Together: ``L + W = B``. *Unvouched
   values.* A value loaded when Redis could not be asked (breaker open, an error) may predate a commit whose fence
   message came before its load began, so nothing vouches for it: it lives in L1 at most ``L`` after its fetch
   began, is never kept as a last-known value (stale-if-error), and nothing derived from it is cached.
5. *Epochs.* Every new subscriber session, every real gap in ``seq`` and every new Redis incarnation starts a new L1
   epoch: L1 and its last-known values are emptied and every ticket in flight is void.
6. *Incarnation fence.* Every new Redis connection reads the server's ``run_id`` before its first command. Values
   are stamped with the incarnation their load began in; a value of another incarnation is never served or used. A
   restart (also from a snapshot), a restore or a failover changes ``run_id``: nothing from before is trusted.
7. *No spurious flushes.* Sequence numbers are taken by the publishing script, so a gap is a lost message, never
   a reordering. Own messages are skipped by sender id (already applied before the answer), never by key.

*Assumption about Redis:* on one connection, pub/sub delivers every message in order, or closes the connection
(Redis drops a subscriber's messages only by disconnecting it, e.g. at ``client-output-buffer-limit pubsub``), and
answers a ``PING`` on that connection after the messages queued before it. The simulation
(``tests/test_simulation.py``) checks the rules above on thousands of random schedules under that assumption.

**Bounds per failure** (B = 100 ms):

=============================================  ================================================================
no fault                                       peers apply within the pub/sub latency (ms); always ≤ B
subscriber killed / connection black-holed     ≤ B (rule 4); L1 emptied when the next session starts
one instance partitioned from Redis            its writes 503; it serves L1 ≤ B, then reads the origin
writer loses Redis before committing           503, nothing changed
writer dies after committing                   nothing outstanding: the invalidation preceded the commit
writer loses Redis after committing            503 invalidation-pending; the outbox applies it (≤ sweep + grace)
commit the writer never heard of               applied by the outbox sweep (≤ sweep + grace); not a 2xx
Redis restarted between a fence and its commit  invalidated again before the answer (or 503 invalidation-pending)
Redis restart / snapshot / failover            ≤ B (rules 4-6); values from before are never served
Redis down for everyone                        L1 serves fetches ≤ B old; reads go to the origin; writes 503
concurrent writes to one key                   fences are per writer: none is lifted by another's commit
=============================================  ================================================================
"""

from tiers.coherence.engine import Coherence, CoherenceConfig, InvalidationPending, WriteUnavailable
from tiers.coherence.store import Acquired, Status, Store

__all__ = [
    "Acquired",
    "Coherence",
    "CoherenceConfig",
    "InvalidationPending",
    "Status",
    "Store",
    "WriteUnavailable",
]
