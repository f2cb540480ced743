"""The consistency checker's report, fed synthetic timelines (pure functions: no servers, no clocks)."""

from __future__ import annotations

import pytest

from bench.consistency import decode_version, encode_version
from bench.consistency_report import (
    NOT_FOUND,
    Read,
    Write,
    beyond_bounds,
    build_report,
    convergence_times,
    keys_stale_at_end,
    nines,
    percentile,
    stale_reads,
)

K = "CK0/USD"


def w(version: int, sent: float, acked: float | None, key: str = K) -> Write:
    return Write(key, version, sent, acked, "200" if acked is not None else "timeout")


def r(inst: int, sent: float, version: int | None, recv: float | None = None, key: str = K, x: str = "L1") -> Read:
    return Read(key, inst, sent, sent + 0.001 if recv is None else recv, "200", version, x)


def test_a_read_sent_after_the_ack_that_shows_the_old_value_is_stale_by_the_gap() -> None:
    writes = [w(1, 0.0, 0.01), w(2, 1.0, 1.01)]
    reads = [r(0, 1.5, 1)]
    [s] = stale_reads(writes, reads)
    assert s.expected == 2
    assert s.staleness == pytest.approx(0.49)


def test_a_read_sent_before_the_ack_is_not_stale() -> None:
    writes = [w(1, 0.0, 0.01), w(2, 1.0, 1.01)]
    assert stale_reads(writes, [r(0, 1.005, 1, recv=1.2), r(0, 1.01, 1)]) == []  # sent at/before the ack


def test_staleness_counts_from_the_first_newer_acked_write() -> None:
    writes = [w(1, 0.0, 0.01), w(2, 1.0, 1.0), w(3, 2.0, 2.0)]
    [s] = stale_reads(writes, [r(1, 2.5, 1)])
    assert s.expected == 3
    assert s.staleness == pytest.approx(1.5)  # from the ack of version 2, the first write newer than what it got


def test_unacked_writes_and_failed_reads_are_not_judged_and_404_is_older_than_anything() -> None:
    writes = [w(1, 0.0, 0.01), w(2, 1.0, None)]
    reads = [r(0, 2.0, 1), r(0, 2.0, 2), r(0, 2.0, None), r(2, 2.0, NOT_FOUND)]
    [s] = stale_reads(writes, reads)
    assert s.read.version == NOT_FOUND


def test_report_flags_only_stale_reads_beyond_the_bound() -> None:
    writes = [w(1, 0.0, 0.0), w(2, 1.0, 1.0)]
    reads = [r(0, 1.05, 1), r(1, 1.3, 1), r(2, 1.5, 2)]  # 50 ms and 300 ms stale
    final = {(K, i): 2 for i in range(3)}
    rep = build_report(writes, reads, n_instances=3, bound_s=0.1, final=final)
    assert rep["stale"]["count"] == 2
    assert rep["stale"]["beyond_bound"] == 1
    assert rep["stale"]["worst"][0]["instance"] == "1"
    assert rep["ok"] is False


def test_convergence_is_the_slowest_instance_and_a_superseded_write_converges_with_the_newer_one() -> None:
    writes = [w(1, 0.0, 0.0), w(2, 1.0, 1.0), w(3, 1.1, 1.1)]
    reads = [
        r(0, 0.0, 1, recv=0.01),
        r(1, 0.0, 1, recv=0.02),
        r(0, 1.2, 3, recv=1.25),  # instance 0 jumps straight to 3
        r(1, 1.2, 1, recv=1.21),
        r(1, 1.4, 3, recv=1.5),  # instance 1 stale once, then 3
    ]
    conv, unconverged = convergence_times(writes, reads, 2)
    assert unconverged == []
    by_version = {wr.version: t for wr, t in conv.items()}
    assert by_version[1] == pytest.approx(0.02)
    assert by_version[2] == pytest.approx(0.5)  # superseded by 3, converged when instance 1 served 3
    assert by_version[3] == pytest.approx(0.4)


def test_convergence_restarts_after_a_later_stale_read_and_never_goes_negative() -> None:
    writes = [w(5, 0.0, 1.0)]
    reads = [
        r(0, 0.5, 5, recv=0.6),  # served before the ack arrived: converged at once (0, not negative)
        r(1, 1.1, 5, recv=1.2),
        r(1, 1.3, 4, recv=1.35),
        r(1, 1.8, 5, recv=2.0),
    ]  # flapped back
    conv, _ = convergence_times(writes, reads, 2)
    assert list(conv.values()) == [pytest.approx(1.0)]


def test_a_write_an_instance_never_served_is_unconverged() -> None:
    writes = [w(1, 0.0, 0.0)]
    conv, unconverged = convergence_times(writes, [r(0, 0.1, 1)], 2)
    assert conv == {} and unconverged == writes


def test_nines() -> None:
    assert nines(0.999) == 3.0
    assert nines(0.99) == 2.0
    assert nines(0.9) == 1.0
    assert nines(1.0) == "all"
    assert nines(0.0) == 0.0
    assert nines(None) is None


def test_share_within_target_in_the_report() -> None:
    writes = [w(v, float(v), float(v)) for v in range(1, 11)]
    reads = [r(0, float(v), v, recv=v + (2.0 if v == 10 else 0.1)) for v in range(1, 11)]
    rep = build_report(writes, reads, n_instances=1, bound_s=0.1, final={(K, 0): 10})
    c = rep["convergence"]
    assert (c["within_target"], c["share_within_target"], c["nines"]) == (9, 0.9, 1.0)
    assert c["max_ms"] == pytest.approx(2000.0)
    assert rep["ok"] is True


def test_keys_stale_at_end() -> None:
    writes = [w(1, 0.0, 0.0), w(2, 1.0, 1.0), w(3, 2.0, None), w(1, 0.0, 0.0, key="B")]
    final = {(K, 0): 2, (K, 1): 3, (K, 2): 1, ("B", 0): None, ("B", 1): 1}
    stale = keys_stale_at_end(writes, final)
    assert [(e["key"], e["instance"]) for e in stale] == [("B", 0), (K, 2)]
    rep = build_report(writes, [], n_instances=3, bound_s=0.1, final=final)
    assert rep["end"]["keys_stale"] == 2 and rep["ok"] is False


def test_percentile_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 99) == 99.0


def test_version_round_trip_through_the_rate_string() -> None:
    v = 17_800_000_000_000_123
    assert decode_version(encode_version(v)) == v
    assert decode_version("1.0178") == 17_800_000_000_000_000  # trailing zeros dropped by a server: still decodes
    assert decode_version("0.00065") == 0  # not a checker-written value: older than anything the checker wrote
    assert decode_version("not a number") is None


def test_beyond_bounds_gives_each_write_its_own_bound() -> None:
    deferred = Write(K, 2, 1.0, 1.01, "200 deferred")
    writes = [w(1, 0.0, 0.01), deferred, w(3, 3.0, 3.01)]

    def bound(x: Write) -> float:
        return 1.1 if x.status == "200 deferred" else 0.1

    stale = stale_reads(writes, [r(0, 1.5, 1), r(1, 2.5, 1), r(2, 3.05, 2), r(2, 3.5, 2)])
    assert [s.read.sent for s in stale] == [1.5, 2.5, 3.05, 3.5]
    # 1.5: 0.49 s after the deferred write (bound 1.1): within; 2.5: 1.49 s: beyond; 3.05: 0.04 s after write 3:
    # within; 3.5: 0.49 s after the normal write 3 (bound 0.1): beyond
    assert [s.read.sent for s in beyond_bounds(writes, stale, bound)] == [2.5, 3.5]
    # one bound for every write is the report's staleness > B
    uniform = beyond_bounds(writes, stale, lambda _w: 0.1)
    assert [s.read.sent for s in uniform] == [s.read.sent for s in stale if s.staleness > 0.1]
