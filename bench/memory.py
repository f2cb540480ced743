"""Memory: L1 bytes per entry for each data type at the configured size (``l1.max_entries``).

For each data type the L1 is filled through the actor's own entry builder with ``max_entries`` distinct keys and
realistic answers (the service's JSON shapes); tracemalloc measures what L1 holds (the TLRU cache, the last-known
LRU and the invalidation-group index). Then 2× and 4× more keys are written: the bound must hold (size stays
``max_entries``, memory reaches a plateau: the TLRU heap keeps evicted items as tombstones up to 2× its size and the
group index is pruned at 2× max_entries, so it grows past the first fill, then stops). The baseline is the payload
itself (key + body bytes): the ratio is L1's overhead per entry.

    python -m bench.memory [--smoke] [--entries N]
"""

from __future__ import annotations

import gc
import sys
import tracemalloc
from typing import Any

import orjson

from bench._common import ROOT, Result, parser


def account(i: int) -> str:
    return "G" + f"{i:055d}".translate(str.maketrans("0123456789", "ABCDEFGHIJ"))


def bodies(kind: str, i: int) -> tuple[Any, bytes]:
    from tiers import keys

    issuer = account(10**9)
    if kind == "exchange_rate":
        return keys.rate(f"B{i:05d}", "USD"), orjson.dumps(
            {
                "base": f"B{i:05d}",
                "quote": "USD",
                "rate": "0.00065",
                "source": "bench",
                "updated_at": "2026-01-01T00:00:00.000000Z",
            }
        )
    if kind == "conversion":
        return keys.conversion(f"{i}.5", "CNGN", "USD"), orjson.dumps(
            {"from": "CNGN", "to": "USD", "rate": "0.00065", "result": "0.0653250"}
        )
    if kind == "fee_structure":
        return keys.fee_structure(f"fee_{i}"), orjson.dumps(
            {"fee_type": f"fee_{i}", "rate_bps": 150, "flat": "0", "min": "0", "max": "1000", "currency": "NGN"}
        )
    if kind == "wallet_balance":
        a = account(i)
        return keys.balance(a), orjson.dumps(
            {
                "account_id": a,
                "balances": [
                    {
                        "asset_type": "native",
                        "asset_code": "XLM",
                        "asset_issuer": None,
                        "balance": "9.8765432",
                        "limit": None,
                        "is_authorized": None,
                    },
                    {
                        "asset_type": "credit_alphanum4",
                        "asset_code": "USDC",
                        "asset_issuer": issuer,
                        "balance": "125.5000000",
                        "limit": "922337203685.4775807",
                        "is_authorized": True,
                    },
                ],
            }
        )
    if kind == "trustline":
        a = account(i)
        return keys.trustline(a, "USDC", issuer), orjson.dumps(
            {"account_id": a, "asset_code": "USDC", "asset_issuer": issuer, "exists": True, "authorized": True}
        )
    raise ValueError(kind)


KINDS = ["exchange_rate", "conversion", "fee_structure", "wallet_balance", "trustline"]


def measure(kind: str, entries: int) -> dict[str, Any]:
    from bench.l1_hit import install, make_actor

    actor = make_actor(max_entries=entries)
    items = [bodies(kind, i) for i in range(5 * entries)]
    rendered = [(k.render(), b, k) for k, b in items]
    payload = sum(len(r) + len(b) for r, b, _ in rendered[:entries]) / entries
    ttl = 90.0
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for _r, b, k in rendered[:entries]:
        install(actor, k, b, ttl)
    gc.collect()
    full = tracemalloc.get_traced_memory()[0] - base
    for _r, b, k in rendered[entries : 3 * entries]:
        install(actor, k, b, ttl)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0] - base
    for _r, b, k in rendered[3 * entries :]:
        install(actor, k, b, ttl)
    gc.collect()
    after2 = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    # strings and bodies were allocated before tracing: count their bytes as held too (L1 keeps them alive)
    held = full + sum(sys.getsizeof(r) + sys.getsizeof(b) for r, b, _ in rendered[:entries])
    return {
        "data type": kind,
        "entries": len(actor.l1),
        "payload B/entry": payload,
        "L1 B/entry (structures)": full / entries,
        "L1 B/entry (incl. key+body objects)": held / entries,
        "× payload": held / entries / payload,
        "total MiB at max_entries": held / 2**20,
        "growth after 3× keys": (after - full) / max(1, full),
        "growth after 5× keys": (after2 - full) / max(1, full),
        "bounded": len(actor.l1) == entries and after2 <= after * 1.10 + 64 * entries,
    }


def run(smoke: bool, entries: int | None, out: str) -> Result:
    from service.config import load_settings

    configured = load_settings(ROOT / "config.toml", {"REDIS_URL": "none"}).l1.max_entries
    n = entries or configured
    if smoke:
        n = 500
    res = Result(
        "memory",
        f"L1 memory per entry at max_entries = {n}",
        [
            "data type",
            "entries",
            "payload B/entry",
            "L1 B/entry (structures)",
            "L1 B/entry (incl. key+body objects)",
            "× payload",
            "total MiB at max_entries",
            "growth after 3× keys",
            "growth after 5× keys",
            "bounded",
        ],
    )
    for kind in KINDS:
        row = measure(kind, n)
        res.rows.append(row)
        res.check(
            f"bounded, {kind}",
            row["entries"],
            n,
            row["growth after 5× keys"],
            "size = max_entries, plateau",
            row["bounded"],
            "entries",
        )
    res.meta.update(max_entries=n, configured_max_entries=configured)
    res.write(out)
    return res


def main(argv: list[str] | None = None) -> Result:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--entries", type=int, default=None, help="default: l1.max_entries from config.toml")
    a = p.parse_args(argv)
    res = run(a.smoke, a.entries, a.out)
    res.print()
    return res


if __name__ == "__main__":
    main()
