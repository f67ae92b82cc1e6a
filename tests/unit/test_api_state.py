"""The API's per-tenant bookkeeping (pure logic): waits per tenant, keys from CQ_API_KEYS."""

from __future__ import annotations

import pytest

from api.errors import APIError
from api.state import APIState, env_tenants
from completion_queue import Settings
from db import hash_key


def state(**settings: object) -> APIState:
    return APIState(settings=Settings(**settings), client=None, dispatcher=None)  # type: ignore[arg-type]


def test_each_tenant_has_its_own_waits_and_a_refused_one_takes_none() -> None:
    api = state(api_max_waits_per_tenant=2)
    with api.wait_slot("a"), api.wait_slot("a"):
        with pytest.raises(APIError) as refused, api.wait_slot("a"):
            pass  # pragma: no cover - refused before
        assert refused.value.info.status == 429 and refused.value.info.code == "too_many_waits"
        assert refused.value.headers == {"Retry-After": "1"}
        assert api.waiting["a"] == 2
        with api.wait_slot("b"), api.wait_slot(None):  # other tenants, and the operator
            assert api.waiting["b"] == 1 and api.waiting[""] == 1
    assert api.waiting["a"] == api.waiting["b"] == 0
    with api.wait_slot("a"):  # given back on the way out
        pass


def test_cq_api_keys_entries_are_named_tenants_or_named_by_their_hash() -> None:
    tenants = env_tenants(["ops:k-1", "k-2"])
    assert tenants[hash_key("k-1")].name == "ops"
    assert tenants[hash_key("k-2")].name == "key-" + hash_key("k-2")[:8]
    assert hash_key("ops:k-1") not in tenants
