"""Unit tests: the key scheme and decimal handling."""

from __future__ import annotations

from decimal import Decimal

import pytest

from actors.rates import convert
from service.problems import Problem
from service.validation import amount, currency
from tiers import keys
from tiers.keys import DataType, InvalidKey, Namespace


def test_every_seed_data_type_has_a_builder_rendered_v1_namespace_id():
    cases = {
        keys.rate("CNGN", "USD"): ("v1:rate:CNGN:USD", DataType.EXCHANGE_RATE),
        keys.conversion("100.5", "CNGN", "USD"): ("v1:rate:convert:100.5:CNGN:USD", DataType.EXCHANGE_RATE),
        keys.balance("GA123456789"): ("v1:wallet:balance:GA123456789", DataType.WALLET_BALANCE),
        keys.trustline("GA1", "USDC", "GB2"): ("v1:wallet:trustline:GA1:USDC:GB2", DataType.TRUSTLINE),
        keys.fee_structure("onramp"): ("v1:fee:structure:onramp", DataType.FEE_STRUCTURE),
        keys.session("session_123"): ("v1:auth:session:session_123", DataType.USER_SESSION),
        keys.rate_limit("user_123", "login"): ("v1:auth:rate_limit:user_123:login", DataType.RATE_LIMIT),
        keys.jwt_validation("abc123"): ("v1:auth:jwt:abc123", DataType.JWT_VALIDATION),
        keys.transaction_status("tx-1"): ("v1:tx:status:tx-1", DataType.TRANSACTION_STATUS),
        keys.recent_transactions("user_1"): ("v1:tx:recent:user_1", DataType.RECENT_TRANSACTIONS),
        keys.bill_provider("provider_456"): ("v1:bill:provider:provider_456", DataType.BILL_PROVIDER),
    }
    for key, (rendered, dt) in cases.items():
        assert key.render() == rendered == str(key)
        assert key.data_type is dt
        assert keys.namespace_of(rendered) is key.namespace
    assert {k.data_type for k in cases} == set(DataType)


@pytest.mark.parametrize("bad", ["a:b", "*", "a*", "a?", "[a]", "a b", "a\tb", "a\nb", "", "a\\b", "é", "x" * 129])
def test_identifiers_cannot_smuggle_separators_globs_or_whitespace(bad):
    with pytest.raises(InvalidKey):
        keys.balance(bad)
    with pytest.raises(InvalidKey):
        keys.rate("CNGN", bad)


def test_keys_are_values():
    assert keys.rate("A", "B") == keys.rate("A", "B")
    assert hash(keys.rate("A", "B")) == hash(keys.rate("A", "B"))
    assert keys.rate("A", "B") != keys.rate("B", "A")


def test_patterns():
    assert keys.validate_pattern("v1:wallet:balance:*") == "v1:wallet:balance:*"
    assert keys.validate_pattern("v1:rate:convert:*:CNGN:USD")
    for bad in ("v1:*", "v2:rate:*", "v1:wallet:*", "v1:rate:C?", "v1:rate:[x]", "v1:rate:"):
        with pytest.raises(InvalidKey):
            keys.validate_pattern(bad)


def test_a_conversion_is_derived_from_its_pairs_rate_and_nothing_else_is_derived():
    assert keys.deps_of(keys.conversion("1", "CNGN", "USD")) == (keys.rate("CNGN", "USD"),)
    assert keys.deps_of(keys.rate("CNGN", "USD")) == ()
    assert keys.deps_of(keys.balance("G" + "A" * 55)) == ()
    assert Namespace.CONVERSION.prefix == "rate:convert"


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("100.50", "100.5"),
        ("100.5", "100.5"),
        ("100", "100"),
        ("0100.0", "100"),
        ("0.0000001", "0.0000001"),
        ("922337203685.4775807", "922337203685.4775807"),
        ("1.1000000", "1.1"),
    ],
)
def test_amount_canonical_form(text, canonical):
    value, canon = amount(text)
    assert canon == canonical
    assert value == Decimal(text)


def test_amount_bounds():
    for bad in ("0", "0.00000000", "922337203685.4775808", "1.00000001", "1e2", "-1", "", "1,5"):
        with pytest.raises(Problem):
            amount(bad)


def test_currency_normalised_upper():
    assert currency("cngn") == "CNGN"
    with pytest.raises(Problem):
        currency("ÇNGN")


def test_convert_half_even_7_places_no_float():
    assert convert(Decimal("100.50"), Decimal("0.00065")) == Decimal("0.0653250")
    assert convert(Decimal("1"), Decimal("0.00000005")) == Decimal("0.0000000")
    assert convert(Decimal("1"), Decimal("0.00000015")) == Decimal("0.0000002")
    assert convert(Decimal("1"), Decimal("0.00000025")) == Decimal("0.0000002")
    big = convert(Decimal("922337203685.4775807"), Decimal("123456789.123456789123456789"))
    assert str(big) == "113868789656116817700.8271899"  # exact: 28-digit default context would round
