"""schemathesis against the live API's OpenAPI schema: whatever it sends, no 500."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from completion_queue import QUEUE_PREFIX, queue_name
from tests.conftest import Stack
from tests.integration.test_api import KEY, start_api


@pytest.fixture(scope="module")
def api_schema(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[schemathesis.BaseSchema]:
    if stack.backend != "sqlite":
        pytest.skip("the schema is the same on every backend; one is enough")
    # Tight limits keep generated completions short on CPU.
    process, url = start_api(
        stack,
        tmp_path_factory.mktemp("api-schema") / "api.log",
        CQ_API_KEYS=KEY,
        CQ_API_WAIT_TIMEOUT_S="5",
        CQ_MAX_NEW_TOKENS_LIMIT="4",
        CQ_MAX_N="2",
        CQ_MAX_BATCH_REQUESTS="4",
        CQ_API_MAX_BODY_BYTES="65536",
    )
    yield schemathesis.openapi.from_url(f"{url}/openapi.json")
    process.terminate()
    process.wait(30)
    # Generated jobs for models no worker serves leave queues behind; drop them.
    served = queue_name(stack.settings.model).encode()
    for key in stack.redis.scan_iter(f"{QUEUE_PREFIX}*"):
        if not key.startswith(served):
            stack.redis.delete(key)


def test_no_server_errors(api_schema: schemathesis.BaseSchema) -> None:
    # Every operation, with bodies, paths and queries drawn from the schema (and some not).
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 12
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
        def no_500(case: schemathesis.Case) -> None:
            response = case.call(headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
            case.validate_response(response, checks=[not_a_server_error])
            assert "Traceback" not in response.text

        no_500()
