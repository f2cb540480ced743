"""Wallet balances, trustlines and events through the real HTTP app, real Redis and Postgres, and the real
stellar-sdk client talking to the Horizon stand-in (testsupport/horizon_standin.py)."""

from __future__ import annotations

import asyncio

import pytest
from stellar_sdk import Keypair, MuxedAccount
from yarl import URL

from service import appkeys as K
from service.config import ConfigError, load_settings
from tests.conftest import ADMIN, AUTH, ROOT, eventually
from testsupport.horizon_standin import MAX_LIMIT, credit, pool_share

PROBLEM = "application/problem+json"


def new_account() -> str:
    return Keypair.random().public_key


def muxed(account: str, mux_id: int = 42) -> str:
    return MuxedAccount(account, mux_id).account_muxed


USDC_ISSUER = new_account()
CNGN_ISSUER = new_account()
POOL_ID = "dd7b1ab831c273310ddbec6f97870aa83c2fbd78ce22aded37ecbf4f3380fac7"


async def trustline(client, account: str, code: str, issuer: str) -> dict:
    r = await client.get(f"/v1/wallets/{account}/trustlines/{code}/{issuer}")
    assert r.status == 200, await r.text()
    return await r.json()


# ---------------------------------------------------------------- balances


async def test_balances_shape_native_first_pools_omitted(wallet_client, horizon, redis_client):
    g = new_account()
    horizon.fund(
        g,
        credit("USDC", USDC_ISSUER, "125.5000000"),
        credit("cNGNLONGCODE", CNGN_ISSUER, "0.0000000", limit="1000.0000000", authorized=False),
        pool_share(POOL_ID),
        xlm="9.8765432",
    )
    assert horizon.accounts[g][-1]["asset_type"] == "native"  # Horizon lists native last
    client = await wallet_client()
    r = await client.get(f"/v1/wallets/{g}/balances")
    assert r.status == 200 and r.headers["X-Cache"] == "MISS"
    assert r.headers["Content-Type"].startswith("application/json")
    assert await r.json() == {
        "account_id": g,
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
                "asset_issuer": USDC_ISSUER,
                "balance": "125.5000000",
                "limit": MAX_LIMIT,
                "is_authorized": True,
            },
            {
                "asset_type": "credit_alphanum12",
                "asset_code": "cNGNLONGCODE",
                "asset_issuer": CNGN_ISSUER,
                "balance": "0.0000000",
                "limit": "1000.0000000",
                "is_authorized": False,
            },
        ],
    }
    r = await client.get(f"/v1/wallets/{g}/balances")
    assert r.headers["X-Cache"] == "L1"
    assert await redis_client.exists(f"v1:wallet:balance:{g}") == 1
    ttl_ms = await redis_client.pttl(f"v1:wallet:balance:{g}")
    assert 45_000 < ttl_ms <= (45 + 300) * 1000  # TTL + stale-if-error window
    assert horizon.calls[g] == 1


async def test_unfunded_account_is_404_and_cached_briefly(wallet_client, horizon, redis_client):
    g = new_account()
    client = await wallet_client()
    r = await client.get(f"/v1/wallets/{g}/balances")
    assert r.status == 404 and r.headers["Content-Type"].startswith(PROBLEM)
    assert g in (await r.json())["detail"]
    assert (await client.get(f"/v1/wallets/{g}/balances")).status == 404
    r = await client.get(f"/v1/wallets/{g}/trustlines/USDC/{USDC_ISSUER}")
    assert r.status == 404  # unknown account, not "exists: false"
    assert horizon.calls[g] == 1
    assert 0 < await redis_client.pttl(f"v1:wallet:balance:{g}") <= 5_000  # negative_ttl.wallet_balance


# ---------------------------------------------------------------- trustlines


async def test_trustline_true_false_zero_balance_and_pools(wallet_client, horizon, redis_client):
    g = new_account()
    other_issuer = new_account()
    horizon.fund(
        g,
        credit("USDC", USDC_ISSUER, "125.5000000"),
        credit("cNGN", CNGN_ISSUER, "0.0000000", authorized=False),  # zero balance: the trustline exists
        pool_share(POOL_ID),
    )
    client = await wallet_client()
    assert await trustline(client, g, "USDC", USDC_ISSUER) == {
        "account_id": g,
        "asset_code": "USDC",
        "asset_issuer": USDC_ISSUER,
        "exists": True,
        "authorized": True,
    }
    assert await trustline(client, g, "cNGN", CNGN_ISSUER) == {
        "account_id": g,
        "asset_code": "cNGN",
        "asset_issuer": CNGN_ISSUER,
        "exists": True,
        "authorized": False,
    }
    missing = await trustline(client, g, "EURC", USDC_ISSUER)
    assert missing == {
        "account_id": g,
        "asset_code": "EURC",
        "asset_issuer": USDC_ISSUER,
        "exists": False,
        "authorized": None,
    }
    # codes are case-sensitive, and the issuer must match too
    assert (await trustline(client, g, "usdc", USDC_ISSUER))["exists"] is False
    assert (await trustline(client, g, "USDC", other_issuer))["exists"] is False
    # one Horizon call answered all of them (the balances document)
    assert horizon.calls[g] == 1

    # exists=false lives negative_ttl.trustline (30 s), exists=true the trustline TTL (1 h)
    neg = await redis_client.pttl(f"v1:wallet:trustline:{g}:EURC:{USDC_ISSUER}")
    pos = await redis_client.pttl(f"v1:wallet:trustline:{g}:USDC:{USDC_ISSUER}")
    assert 0 < neg <= 30_000
    assert pos > 3_600_000
    r = await client.get(f"/v1/wallets/{g}/trustlines/EURC/{USDC_ISSUER}")
    assert r.headers["X-Cache"] == "L1" and (await r.json())["exists"] is False


async def test_liquidity_pool_entries_never_count_as_trustlines(wallet_client, horizon):
    g = new_account()
    horizon.fund(g, pool_share(POOL_ID))
    client = await wallet_client()
    body = await (await client.get(f"/v1/wallets/{g}/balances")).json()
    assert [b["asset_type"] for b in body["balances"]] == ["native"]
    assert (await trustline(client, g, "USDC", USDC_ISSUER))["exists"] is False
    assert horizon.calls[g] == 1


async def test_muxed_account_normalised_to_its_g_key(wallet_client, horizon, redis_client):
    g = new_account()
    m = muxed(g)
    horizon.fund(g, credit("USDC", USDC_ISSUER, "1.0000000"))
    client = await wallet_client()
    r = await client.get(f"/v1/wallets/{m}/balances")
    assert r.status == 200 and r.headers["X-Cache"] == "MISS"
    assert (await r.json())["account_id"] == g
    r = await client.get(f"/v1/wallets/{g}/balances")
    assert r.headers["X-Cache"] == "L1"  # same key, same entry
    r = await client.get(f"/v1/wallets/{muxed(g, 7)}/balances")
    assert r.headers["X-Cache"] == "L1"
    assert (await trustline(client, m, "USDC", USDC_ISSUER))["account_id"] == g
    assert await redis_client.exists(f"v1:wallet:balance:{g}") == 1
    assert await redis_client.keys(f"v1:wallet:*{m}*") == []
    assert horizon.calls == {g: 1}


def _bad_paths() -> list[str]:
    g = new_account()
    bad_checksum = g[:-1] + ("A" if g[-1] != "A" else "B")
    m = muxed(g)
    bad_muxed = m[:-1] + ("A" if m[-1] != "A" else "C")  # always a change: a muxed key may end in "A"
    secret = Keypair.random().secret
    return [
        "/v1/wallets/GABC/balances",
        f"/v1/wallets/{bad_checksum}/balances",
        f"/v1/wallets/{g.lower()}/balances",
        f"/v1/wallets/{secret}/balances",
        f"/v1/wallets/{g}%20/balances",
        f"/v1/wallets/%20{g}/balances",
        f"/v1/wallets/{g}%0A/balances",
        f"/v1/wallets/{bad_muxed}/balances",
        "/v1/wallets/..%2F..%2Fetc%2Fpasswd/balances",
        "/v1/wallets/..%2F/balances",
        f"/v1/wallets/{g}%2F..%2F{g}/balances",
        f"/v1/wallets/{g}%2Fbalances/balances",
        f"/v1/wallets/{g}%3Fcursor=1/balances",
        f"/v1/wallets/{g}/trustlines/TOOLONGCODE13/{USDC_ISSUER}",
        f"/v1/wallets/{g}/trustlines/US-DC/{USDC_ISSUER}",
        f"/v1/wallets/{g}/trustlines/US%2FDC/{USDC_ISSUER}",
        f"/v1/wallets/{g}/trustlines/..%2F/{USDC_ISSUER}",
        f"/v1/wallets/{g}/trustlines/%C3%9CSD/{USDC_ISSUER}",
        f"/v1/wallets/{g}/trustlines/USDC/{USDC_ISSUER.lower()}",
        f"/v1/wallets/{g}/trustlines/USDC/{muxed(USDC_ISSUER)}",
        f"/v1/wallets/{g}/trustlines/USDC/..%2F..%2Faccounts",
        f"/v1/wallets/GABC/trustlines/USDC/{USDC_ISSUER}",
    ]


@pytest.mark.parametrize("path", _bad_paths())
async def test_bad_input_is_400_before_any_horizon_call(wallet_client, horizon, path):
    client = await wallet_client()
    r = await client.get(URL(path, encoded=True))
    assert r.status == 400, await r.text()
    assert r.headers["Content-Type"].startswith(PROBLEM)
    p = await r.json()
    assert p["status"] == 400 and p["type"].startswith("urn:aframp:problem:invalid-") and p["detail"]
    assert horizon.total == 0


@pytest.mark.parametrize(
    "path", ["/v1/wallets/../balances", "/v1/wallets/%2E%2E/balances", "/v1/wallets/G/../../accounts/balances"]
)
async def test_dot_segments_never_reach_horizon(wallet_client, horizon, path):
    """Dot segments are resolved before routing (RFC 3986), so these name no wallet resource at all."""
    client = await wallet_client()
    r = await client.get(URL(path, encoded=True))
    assert r.status in (400, 404) and r.headers["Content-Type"].startswith(PROBLEM)
    assert horizon.total == 0


# ---------------------------------------------------------------- Horizon failures: clear 5xx, never 500


async def test_rate_limited_is_503_with_retry_after(wallet_client, horizon):
    g = new_account()
    horizon.fund(g)
    horizon.mode, horizon.retry_after = "rate_limit", "17"
    client = await wallet_client()
    r = await client.get(f"/v1/wallets/{g}/balances")
    assert r.status == 503 and r.headers["Retry-After"] == "17"
    assert r.headers["Content-Type"].startswith(PROBLEM)
    r = await client.get(f"/v1/wallets/{g}/trustlines/USDC/{USDC_ISSUER}")
    assert r.status == 503 and r.headers["Retry-After"] == "17"
    # politeness: for as long as Horizon asked, it is not asked again
    assert horizon.calls[g] == 1


async def test_after_429_horizon_is_asked_again_once_retry_after_passed(wallet_client, horizon):
    g = new_account()
    horizon.fund(g)
    horizon.mode, horizon.retry_after = "rate_limit", "1"
    client = await wallet_client()
    assert (await client.get(f"/v1/wallets/{g}/balances")).status == 503
    horizon.mode = None  # Horizon is fine again, but asked us to wait one second
    r = await client.get(f"/v1/wallets/{g}/balances")
    assert r.status == 503 and r.headers["Retry-After"] == "1"
    assert horizon.calls[g] == 1

    async def answered() -> bool:  # errors are not cached: once the second has passed, it loads
        return (await client.get(f"/v1/wallets/{g}/balances")).status == 200

    await eventually(answered, timeout=5)
    assert horizon.calls[g] == 2


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_horizon_5xx_is_502(wallet_client, horizon, status):
    g = new_account()
    horizon.fund(g)
    horizon.mode, horizon.fail_status = "fail", status
    client = await wallet_client()
    r = await client.get(f"/v1/wallets/{g}/balances")
    assert r.status == 502 and r.headers["Content-Type"].startswith(PROBLEM)
    assert "horizon" in (await r.json())["detail"]


async def test_timeout_is_504(wallet_client, horizon):
    g = new_account()
    horizon.fund(g)
    horizon.latency = 30  # released when the stand-in closes
    client = await wallet_client(env={"HORIZON_TIMEOUT": "0.2"})
    r = await client.get(f"/v1/wallets/{g}/balances")
    assert r.status == 504 and r.headers["Content-Type"].startswith(PROBLEM)
    r = await client.get(f"/v1/wallets/{g}/trustlines/USDC/{USDC_ISSUER}")
    assert r.status == 504


async def test_dropped_connection_is_503(wallet_client, horizon):
    g = new_account()
    horizon.fund(g)
    horizon.mode = "drop"
    client = await wallet_client()
    r = await client.get(f"/v1/wallets/{g}/balances")
    assert r.status == 503 and r.headers["Content-Type"].startswith(PROBLEM)
    assert "cannot reach Horizon" in (await r.json())["detail"]


async def test_unreachable_horizon_is_503(make_client, settings_factory):
    # port 9 (discard) on loopback: nothing listens, the connection is refused
    client = await make_client(settings_factory(env={"HORIZON_URL": "http://127.0.0.1:9"}))
    r = await client.get(f"/v1/wallets/{new_account()}/balances")
    assert r.status == 503 and r.headers["Content-Type"].startswith(PROBLEM)


async def test_stale_balance_served_when_horizon_fails(wallet_client, horizon, settings_factory):
    from tiers.keys import DataType

    g = new_account()
    horizon.fund(g, credit("USDC", USDC_ISSUER, "1.0000000"))
    s = settings_factory(env={"HORIZON_URL": horizon.url})
    ttl = dict(s.ttl)
    ttl[DataType.WALLET_BALANCE] = 0.2
    client = await wallet_client(ttl=ttl)
    assert (await client.get(f"/v1/wallets/{g}/balances")).status == 200
    horizon.mode = "fail"

    async def stale() -> bool:
        r = await client.get(f"/v1/wallets/{g}/balances")
        return r.status == 200 and r.headers["X-Cache"] == "STALE" and "Age" in r.headers

    await eventually(stale, timeout=3)


# ---------------------------------------------------------------- one Horizon call per account per TTL window


async def test_fifty_concurrent_balance_and_trustline_reads_one_horizon_call(wallet_client, horizon):
    g = new_account()
    horizon.fund(g, credit("USDC", USDC_ISSUER, "1.0000000"), credit("cNGN", CNGN_ISSUER))
    client = await wallet_client()
    horizon.hold()
    paths = [f"/v1/wallets/{g}/balances"] * 20 + [
        f"/v1/wallets/{g}/trustlines/{code}/{issuer}"
        for code, issuer in [("USDC", USDC_ISSUER), ("cNGN", CNGN_ISSUER), ("EURC", USDC_ISSUER)] * 10
    ]
    tasks = [asyncio.ensure_future(client.get(p)) for p in paths]

    async def arrived() -> bool:
        return horizon.in_flight == 1

    await eventually(arrived)
    horizon.release()
    results = await asyncio.gather(*tasks)
    assert [r.status for r in results] == [200] * 50
    assert horizon.calls[g] == 1
    bodies = [await r.json() for r in results[20:]]
    assert [b["exists"] for b in bodies[:3]] == [True, True, False]


async def test_balance_read_then_trustline_reads_reuse_the_document(wallet_client, horizon):
    g = new_account()
    horizon.fund(g, credit("USDC", USDC_ISSUER, "1.0000000"))
    client = await wallet_client()
    assert (await client.get(f"/v1/wallets/{g}/balances")).status == 200
    assert (await trustline(client, g, "USDC", USDC_ISSUER))["exists"] is True
    assert (await trustline(client, g, "cNGN", CNGN_ISSUER))["exists"] is False
    for _ in range(5):
        assert (await client.get(f"/v1/wallets/{g}/balances")).headers["X-Cache"] == "L1"
    assert horizon.calls[g] == 1
    # a second instance (own L1) is answered from Redis
    other = await wallet_client()
    r = await other.get(f"/v1/wallets/{g}/balances")
    assert r.headers["X-Cache"] == "L2"
    r = await other.get(f"/v1/wallets/{g}/trustlines/USDC/{USDC_ISSUER}")
    assert r.headers["X-Cache"] == "L2"
    r = await other.get(f"/v1/wallets/{g}/trustlines/EURC/{USDC_ISSUER}")  # new key, balance from Redis
    assert r.headers["X-Cache"] == "MISS" and (await r.json())["exists"] is False
    assert horizon.calls[g] == 1


async def test_one_call_per_ttl_window(wallet_client, horizon, settings_factory):
    from tiers.keys import DataType

    g = new_account()
    horizon.fund(g, credit("USDC", USDC_ISSUER, "1.0000000"))
    s = settings_factory()
    ttl = dict(s.ttl)
    ttl[DataType.WALLET_BALANCE] = 0.3
    client = await wallet_client(ttl=ttl)
    for _ in range(3):
        assert (await client.get(f"/v1/wallets/{g}/balances")).status == 200
    assert horizon.calls[g] == 1
    horizon.fund(g, credit("USDC", USDC_ISSUER, "2.0000000"))

    l1 = client.app[K.L1_CACHE]

    async def expired() -> bool:  # no reads meanwhile: a hot key would be refreshed ahead instead
        return l1.get(f"v1:wallet:balance:{g}") is None

    await eventually(expired, timeout=3)
    assert (await client.get(f"/v1/wallets/{g}/balances")).headers["X-Cache"] == "MISS"
    assert horizon.calls[g] == 2
    body = await (await client.get(f"/v1/wallets/{g}/balances")).json()
    assert body["balances"][1]["balance"] == "2.0000000"


# ---------------------------------------------------------------- events


async def _warm(client, *accounts: str) -> None:
    for a in accounts:
        assert (await client.get(f"/v1/wallets/{a}/balances")).status == 200
        assert (await client.get(f"/v1/wallets/{a}/trustlines/USDC/{USDC_ISSUER}")).status == 200


async def test_balance_updated_invalidates_only_that_balance(wallet_client, horizon, redis_client):
    a, b = new_account(), new_account()
    horizon.fund(a, credit("USDC", USDC_ISSUER, "1.0000000"))
    horizon.fund(b, credit("USDC", USDC_ISSUER, "5.0000000"))
    client = await wallet_client()
    other = await wallet_client()
    await _warm(client, a, b)
    await _warm(other, a)
    horizon.fund(a, credit("USDC", USDC_ISSUER, "3.0000000"))

    r = await client.post("/v1/events/balance-updated", json={"account_id": muxed(a)}, headers=AUTH)
    assert r.status == 200
    assert await r.json() == {"invalidated": [f"v1:wallet:balance:{a}"]}
    assert await redis_client.exists(f"v1:wallet:balance:{a}") == 0
    assert await redis_client.exists(f"v1:wallet:balance:{b}") == 1
    assert await redis_client.exists(f"v1:wallet:trustline:{a}:USDC:{USDC_ISSUER}") == 1
    r = await client.get(f"/v1/wallets/{a}/balances")
    assert r.headers["X-Cache"] == "MISS" and (await r.json())["balances"][1]["balance"] == "3.0000000"
    assert (await client.get(f"/v1/wallets/{b}/balances")).headers["X-Cache"] == "L1"
    # the trustline answer is derived from the balances document: it went with it, and is derived again from the
    # balance just reloaded (no Horizon call of its own)
    r = await client.get(f"/v1/wallets/{a}/trustlines/USDC/{USDC_ISSUER}")
    assert r.headers["X-Cache"] == "MISS"
    assert horizon.calls == {a: 2, b: 1}

    async def other_sees_new() -> bool:
        body = await (await other.get(f"/v1/wallets/{a}/balances")).json()
        return body["balances"][1]["balance"] == "3.0000000"

    await eventually(other_sees_new, timeout=2)
    assert horizon.calls == {a: 2, b: 1}


async def test_transaction_completed_invalidates_sender_and_receiver(wallet_client, horizon, redis_client):
    sender, receiver, bystander = new_account(), new_account(), new_account()
    for acct in (sender, receiver, bystander):
        horizon.fund(acct, credit("USDC", USDC_ISSUER, "10.0000000"))
    client = await wallet_client()
    await _warm(client, sender, receiver, bystander)
    horizon.fund(sender, credit("USDC", USDC_ISSUER, "7.5000000"))
    horizon.fund(receiver, credit("USDC", USDC_ISSUER, "12.5000000"))

    event = {"transaction_id": "a" * 64, "sender": muxed(sender), "receiver": receiver}
    r = await client.post("/v1/events/transaction-completed", json=event, headers=AUTH)
    assert r.status == 200
    assert await r.json() == {"invalidated": [f"v1:wallet:balance:{sender}", f"v1:wallet:balance:{receiver}"]}
    assert await redis_client.exists(f"v1:wallet:balance:{bystander}") == 1
    assert await redis_client.exists(f"v1:wallet:trustline:{sender}:USDC:{USDC_ISSUER}") == 1
    for acct, amount in ((sender, "7.5000000"), (receiver, "12.5000000")):
        r = await client.get(f"/v1/wallets/{acct}/balances")
        assert r.headers["X-Cache"] == "MISS" and (await r.json())["balances"][1]["balance"] == amount
    assert (await client.get(f"/v1/wallets/{bystander}/balances")).headers["X-Cache"] == "L1"
    assert horizon.calls == {sender: 2, receiver: 2, bystander: 1}

    # a payment to oneself names the balance once
    r = await client.post(
        "/v1/events/transaction-completed",
        json={"transaction_id": "t-2", "sender": sender, "receiver": muxed(sender, 9)},
        headers=AUTH,
    )
    assert await r.json() == {"invalidated": [f"v1:wallet:balance:{sender}"]}


async def test_trustline_created_answers_true_everywhere_without_horizon(wallet_client, horizon, redis_client):
    g, bystander = new_account(), new_account()
    horizon.fund(g, credit("USDC", USDC_ISSUER, "1.0000000"))
    horizon.fund(bystander)
    a = await wallet_client()
    b = await wallet_client()
    await _warm(b, bystander)
    # both instances hold the negative answer (b in L1, Redis too)
    assert (await trustline(b, g, "cNGN", CNGN_ISSUER))["exists"] is False
    assert (await trustline(a, g, "cNGN", CNGN_ISSUER))["exists"] is False
    assert horizon.calls[g] == 1
    key = f"v1:wallet:trustline:{g}:cNGN:{CNGN_ISSUER}"

    # Horizon has not caught up yet (it still has no cNGN entry): the event alone must make it true
    r = await a.post(
        "/v1/events/trustline-created",
        json={"account_id": g, "asset_code": "cNGN", "asset_issuer": CNGN_ISSUER, "authorized": True},
        headers=AUTH,
    )
    assert r.status == 200
    assert await r.json() == {"invalidated": [f"v1:wallet:balance:{g}"], "cached": [key]}
    assert await redis_client.pttl(key) > 3_600_000  # the positive TTL, not the negative one
    assert await redis_client.exists(f"v1:wallet:balance:{g}") == 0
    r = await a.get(f"/v1/wallets/{g}/trustlines/cNGN/{CNGN_ISSUER}")
    assert r.headers["X-Cache"] == "L2"  # the told value, from Redis (L1 dropped the old answer)
    assert await r.json() == {
        "account_id": g,
        "asset_code": "cNGN",
        "asset_issuer": CNGN_ISSUER,
        "exists": True,
        "authorized": True,
    }

    async def b_sees_true() -> bool:
        return (await trustline(b, g, "cNGN", CNGN_ISSUER))["exists"] is True

    await eventually(b_sees_true, timeout=2)
    assert horizon.calls[g] == 1  # nobody asked Horizon
    assert (await b.get(f"/v1/wallets/{bystander}/balances")).headers["X-Cache"] == "L1"

    # without "authorized" the event caches exists=true with authorized unknown (null)
    r = await a.post(
        "/v1/events/trustline-created",
        json={"account_id": muxed(g), "asset_code": "EURC", "asset_issuer": USDC_ISSUER},
        headers=AUTH,
    )
    assert r.status == 200
    assert await trustline(a, g, "EURC", USDC_ISSUER) == {
        "account_id": g,
        "asset_code": "EURC",
        "asset_issuer": USDC_ISSUER,
        "exists": True,
        "authorized": None,
    }
    assert horizon.calls[g] == 1


EVENTS = [
    (
        "/v1/events/transaction-completed",
        lambda: {"transaction_id": "t1", "sender": new_account(), "receiver": new_account()},
    ),
    (
        "/v1/events/trustline-created",
        lambda: {"account_id": new_account(), "asset_code": "USDC", "asset_issuer": USDC_ISSUER},
    ),
    ("/v1/events/balance-updated", lambda: {"account_id": new_account()}),
]


@pytest.mark.parametrize(("path", "body"), EVENTS)
async def test_events_need_the_admin_token(wallet_client, path, body):
    client = await wallet_client()
    r = await client.post(path, json=body())
    assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    r = await client.post(path, json=body(), headers={"Authorization": "Bearer wrong-token-0123456789"})
    assert r.status == 401
    closed = await wallet_client(env={"ADMIN_TOKEN": ""})
    r = await closed.post(path, json=body(), headers=AUTH)
    assert r.status == 403 and r.headers["Content-Type"].startswith(PROBLEM)
    r = await client.post(path, json=body(), headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status == 200


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/events/balance-updated", {"account_id": "GABC"}),
        ("/v1/events/balance-updated", {"account_id": "..%2F"}),
        ("/v1/events/balance-updated", {"account_id": 42}),
        ("/v1/events/balance-updated", {}),
        ("/v1/events/balance-updated", {"account_id": USDC_ISSUER, "extra": 1}),
        ("/v1/events/transaction-completed", {"transaction_id": "t", "sender": USDC_ISSUER}),
        ("/v1/events/transaction-completed", {"transaction_id": "", "sender": USDC_ISSUER, "receiver": USDC_ISSUER}),
        (
            "/v1/events/transaction-completed",
            {"transaction_id": "t", "sender": USDC_ISSUER, "receiver": USDC_ISSUER.lower()},
        ),
        (
            "/v1/events/trustline-created",
            {"account_id": USDC_ISSUER, "asset_code": "TOOLONGCODE13", "asset_issuer": CNGN_ISSUER},
        ),
        (
            "/v1/events/trustline-created",
            {"account_id": USDC_ISSUER, "asset_code": "USDC", "asset_issuer": muxed(CNGN_ISSUER)},
        ),
        (
            "/v1/events/trustline-created",
            {"account_id": USDC_ISSUER, "asset_code": "USDC", "asset_issuer": CNGN_ISSUER, "authorized": "yes"},
        ),
    ],
)
async def test_event_bodies_validated(wallet_client, horizon, path, body):
    client = await wallet_client()
    r = await client.post(path, json=body, headers=AUTH)
    assert r.status == 400 and r.headers["Content-Type"].startswith(PROBLEM)
    r = await client.post(path, data=b"not json", headers=AUTH)
    assert r.status == 400
    assert horizon.total == 0


# ---------------------------------------------------------------- wiring and configuration


async def test_one_horizon_client_closed_at_shutdown(wallet_client, horizon):
    g = new_account()
    horizon.fund(g)
    client = await wallet_client()
    origin = client.app[K.HORIZON]
    assert (await client.get(f"/v1/wallets/{g}/balances")).status == 200
    session = origin.server._client._session  # the SDK client's one aiohttp session
    assert session is not None and not session.closed
    await client.close()
    assert session.closed


def test_platform_assets_config(tmp_path):
    s = load_settings(ROOT / "config.toml", {})
    assert [(a.code, a.issuer) for a in s.horizon.assets] == [("cNGN", "")]

    def load(assets: str) -> None:
        text = (ROOT / "config.toml").read_text().replace('[[horizon.assets]]\ncode = "cNGN"\nissuer = ""', assets)
        path = tmp_path / "c.toml"
        path.write_text(text)
        load_settings(path, {})

    issuer = new_account()
    load(f'[[horizon.assets]]\ncode = "cNGN"\nissuer = "{issuer}"')
    for bad, needle in [
        ('[[horizon.assets]]\ncode = "cNGN-X"\nissuer = ""', "horizon.assets[0].code"),
        ('[[horizon.assets]]\ncode = "cNGN"\nissuer = "GABC"', "horizon.assets[0].issuer"),
        ('[[horizon.assets]]\ncode = "cNGN"\nissuer = ""\nextra = 1', "horizon.assets[0].extra"),
        ('[[horizon.assets]]\ncode = "cNGN"\n[[horizon.assets]]\ncode = "cNGN"', "horizon.assets[1]"),
    ]:
        with pytest.raises(ConfigError) as err:
            load(bad)
        assert needle in str(err.value) and "\n" not in str(err.value)
