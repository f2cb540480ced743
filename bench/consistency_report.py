"""Pure report computation for the consistency checker (no I/O, no clocks): feed it event timelines.

Times are seconds on one monotonic clock (the checker's). Versions are integers encoded in the rate value of
each write; a read's ``version`` is the version it returned, :data:`NOT_FOUND` for a 404, ``None`` when the
read failed (timeout, 5xx, unparsable body) and so tells nothing about freshness.

Definitions (also in docs/COHERENCE.md):

* A read is **stale** when its version is older than the newest write on its key whose acknowledgement (the
  200 of the PUT) arrived *before the read was sent*. Its **staleness** is ``read.sent - ack`` of the first
  newer write acknowledged before that send, i.e. how long the instance went on serving an answer that was
  already replaced. Reads sent before an ack are never stale with respect to that write.
* A write's **convergence time** is ``max over instances`` of the time from its ack until the instance served a
  value with a version ``>=`` the write's (taking the first such read after the instance's last stale read of
  it). A write superseded by a newer one before every instance served it counts as converged when the
  instances serve the newer value (any version ``>=`` its own satisfies it). A write some instance never
  showed is **unconverged** (its convergence is unknown and counts as not within the target).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

NOT_FOUND = -1  # a 404 for a key the checker created: older than any write


@dataclass(slots=True, frozen=True)
class Write:
    key: str
    version: int
    sent: float
    acked: float | None  # when the 200 arrived; None when the write failed or timed out
    status: str  # "200", "409", "timeout", "error:ClientOSError", ...
    via: int = 0  # the instance the write was sent to


@dataclass(slots=True, frozen=True)
class Read:
    key: str
    instance: int
    sent: float
    recv: float
    status: str
    version: int | None  # None: failed read (not judged); NOT_FOUND: 404
    xcache: str | None = None
    phase: str = "load"  # "load" or "settle"
    kind: str = "rate"  # "rate" (GET /v1/rates/F/T) or "convert" (GET /v1/rates/convert: judged by its rate)


@dataclass(slots=True, frozen=True)
class StaleRead:
    read: Read
    expected: int  # newest version acknowledged before the read was sent
    staleness: float  # read.sent - ack of the first newer write acknowledged before the send


# ---------------------------------------------------------------- small helpers


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def nines(share: float | None) -> float | str | None:
    """99.9 % → 3.0; 1.0 → "all"; 0 → 0.0; None → None."""
    if share is None:
        return None
    if share >= 1.0:
        return "all"
    if share <= 0.0:
        return 0.0
    return round(-math.log10(1.0 - share), 2)


def summary_ms(values: Sequence[float]) -> dict[str, float | None]:
    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 2)

    return {
        "p50_ms": ms(percentile(values, 50)),
        "p99_ms": ms(percentile(values, 99)),
        "max_ms": ms(max(values) if values else None),
    }


def acked_by_key(writes: Iterable[Write]) -> dict[str, list[Write]]:
    """Acknowledged writes per key, in acknowledgement order."""
    out: dict[str, list[Write]] = defaultdict(list)
    for w in writes:
        if w.acked is not None:
            out[w.key].append(w)
    for ws in out.values():
        ws.sort(key=lambda w: w.acked)  # type: ignore[arg-type, return-value]
    return out


# ---------------------------------------------------------------- staleness


def stale_reads(writes: Iterable[Write], reads: Iterable[Read]) -> list[StaleRead]:
    by_key = acked_by_key(writes)
    acks = {k: [w.acked for w in ws if w.acked is not None] for k, ws in by_key.items()}
    out: list[StaleRead] = []
    for r in reads:
        if r.version is None:
            continue
        ws = by_key.get(r.key)
        if not ws:
            continue
        before = ws[: bisect_left(acks[r.key], r.sent)]  # acknowledged strictly before the read was sent
        if not before:
            continue
        expected = max(w.version for w in before)
        if r.version >= expected:
            continue
        first_newer = min(w.acked for w in before if w.version > r.version)  # type: ignore[type-var]
        out.append(StaleRead(r, expected, r.sent - first_newer))  # type: ignore[operator]
    return out


def beyond_bounds(
    writes: Iterable[Write], stale: Iterable[StaleRead], bound_of: Callable[[Write], float]
) -> list[StaleRead]:
    """The stale reads that some write outlived its own bound for: a write ``w`` newer than the read's version,
    acknowledged before the read was sent, with ``read.sent - w.acked > bound_of(w)``.

    With ``bound_of = lambda w: B`` this is exactly the ``staleness > B`` test of :func:`build_report` (the first
    newer write acknowledged is the oldest); a per-write bound lets a weaker documented guarantee (e.g. a write
    acknowledged with ``X-Invalidation: deferred``) have a longer bound than the others."""
    by_key = acked_by_key(writes)
    out = []
    for s in stale:
        r = s.read
        for w in by_key.get(r.key, ()):
            assert w.acked is not None
            if w.acked >= r.sent:
                break  # in acknowledgement order: the rest were acknowledged after the read was sent
            if r.version is not None and w.version > r.version and r.sent - w.acked > bound_of(w):
                out.append(s)
                break
    return out


# ---------------------------------------------------------------- convergence


def convergence_times(
    writes: Iterable[Write], reads: Iterable[Read], n_instances: int, instances: Sequence[int] | None = None
) -> tuple[dict[Write, float], list[Write]]:
    """(converged write → seconds from ack to the last instance serving >= its version, unconverged writes).

    ``instances``: the instances convergence is measured on (default all; a fault may have killed one)."""
    per: dict[tuple[str, int], list[Read]] = defaultdict(list)
    for r in reads:
        if r.version is not None:
            per[(r.key, r.instance)].append(r)
    for rs in per.values():
        rs.sort(key=lambda r: r.sent)
    converged: dict[Write, float] = {}
    unconverged: list[Write] = []
    for ws in acked_by_key(writes).values():
        for w in ws:
            ack = w.acked
            assert ack is not None
            worst: float | None = 0.0
            for i in range(n_instances) if instances is None else instances:
                t = _instance_converged(per.get((w.key, i), []), w.version, ack)
                if t is None:
                    worst = None
                    break
                worst = max(worst, t)  # type: ignore[type-var]
            if worst is None:
                unconverged.append(w)
            else:
                converged[w] = worst
    return converged, unconverged


def _instance_converged(rs: list[Read], version: int, ack: float) -> float | None:
    """Seconds from ``ack`` until this instance served >= ``version`` for good (None if it never did)."""
    start = 0
    for idx, r in enumerate(rs):  # the last read sent after the ack that still showed an older version
        if r.sent > ack and r.version is not None and r.version < version:
            start = idx + 1
    for r in rs[start:]:
        if r.version is not None and r.version >= version:
            return max(0.0, r.recv - ack)
    return None


# ---------------------------------------------------------------- end state


def keys_stale_at_end(writes: Iterable[Write], final: Mapping[tuple[str, int], int | None]) -> list[dict[str, Any]]:
    """Every (key, instance) whose final read is older than the key's last acknowledged write (or failed)."""
    last: dict[str, int] = {}
    for k, ws in acked_by_key(writes).items():
        last[k] = max(w.version for w in ws)
    out = []
    for (key, inst), got in sorted(final.items()):
        expected = last.get(key)
        if expected is None:
            continue
        if got is None or got < expected:
            out.append({"key": key, "instance": inst, "expected": expected, "got": got})
    return out


# ---------------------------------------------------------------- the report


def build_report(
    writes: Sequence[Write],
    reads: Sequence[Read],
    *,
    n_instances: int,
    bound_s: float,
    final: Mapping[tuple[str, int], int | None],
    target_s: float = 1.0,
    instance_names: Sequence[str] | None = None,
    extra: Mapping[str, Any] | None = None,
    converge_on: Sequence[int] | None = None,
) -> dict[str, Any]:
    names = list(instance_names or [str(i) for i in range(n_instances)])
    stale = stale_reads(writes, reads)
    staleness = [s.staleness for s in stale]
    beyond = [s for s in stale if s.staleness > bound_s]
    converged, unconverged = convergence_times(writes, reads, n_instances, converge_on)
    acked = [w for w in writes if w.acked is not None]
    within = sum(1 for t in converged.values() if t <= target_s)
    share = within / len(acked) if acked else None
    end = keys_stale_at_end(writes, final)
    load_reads = [r for r in reads if r.phase == "load"]
    judged = [r for r in reads if r.version is not None]
    latency = [r.recv - r.sent for r in load_reads]
    report: dict[str, Any] = {
        "instances": names,
        "bound_ms": round(bound_s * 1000, 3),
        "writes": {
            "total": len(writes),
            "acked": len(acked),
            "status": dict(Counter(w.status for w in writes)),
        },
        "reads": {
            "total": len(load_reads),
            "settle": len(reads) - len(load_reads),
            "judged": len(judged),
            "status": dict(Counter(r.status for r in load_reads)),
            "x_cache": dict(Counter(r.xcache or "-" for r in load_reads if r.status == "200")),
            "per_instance": {names[i]: sum(1 for r in load_reads if r.instance == i) for i in range(n_instances)},
            "by_kind": {
                kind: {
                    "total": sum(1 for r in load_reads if r.kind == kind),
                    "judged": sum(1 for r in judged if r.kind == kind),
                }
                for kind in sorted({r.kind for r in reads})
            },
            "latency": summary_ms(latency),
        },
        "stale": {
            "count": len(stale),
            "beyond_bound": len(beyond),
            "staleness": summary_ms(staleness),
            "by_instance": dict(Counter(names[s.read.instance] for s in stale)),
            "by_x_cache": dict(Counter(s.read.xcache or "-" for s in stale)),
            "by_phase": dict(Counter(s.read.phase for s in stale)),
            "by_kind": dict(Counter(s.read.kind for s in stale)),
            "beyond_bound_by_kind": dict(Counter(s.read.kind for s in beyond)),
            "worst": [_stale_json(s, names) for s in sorted(stale, key=lambda s: -s.staleness)[:10]],
        },
        "convergence": {
            "superseded_writes": "a write superseded before every instance served it counts as converged when "
            "every instance serves the newer value (any version >= its own)",
            "writes": len(acked),
            "measured_on": names if converge_on is None else [names[i] for i in converge_on],
            "converged": len(converged),
            "unconverged": len(unconverged),
            **summary_ms(list(converged.values())),
            "target_ms": round(target_s * 1000, 3),
            "within_target": within,
            "share_within_target": None if share is None else round(share, 6),
            "nines": nines(share),
        },
        "end": {
            "checked": len(final),
            "keys_stale": len({e["key"] for e in end}),
            "stale_pairs": [{**e, "instance": names[e["instance"]]} for e in end],
        },
    }
    if extra:
        report.update(extra)
    report["ok"] = report["stale"]["beyond_bound"] == 0 and report["end"]["keys_stale"] == 0
    return report


def _stale_json(s: StaleRead, names: Sequence[str]) -> dict[str, Any]:
    return {
        "key": s.read.key,
        "instance": names[s.read.instance],
        "staleness_ms": round(s.staleness * 1000, 2),
        "got": s.read.version,
        "expected": s.expected,
        "x_cache": s.read.xcache,
        "phase": s.read.phase,
        "kind": s.read.kind,
        "sent_s": round(s.read.sent, 4),
    }
