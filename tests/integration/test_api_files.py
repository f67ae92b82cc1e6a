"""Listing and deleting files, listing batches: a real `cq api` and worker, the official client.

Each test has tenants of its own (keys in CQ_API_KEYS), so its listings hold
only what it made, whatever other tests left in the database.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest

from tests.conftest import Stack, until
from tests.integration.test_api import assert_error, start_api

TENANTS = ("lister", "deleter", "batcher", "other")


@dataclass
class FilesApi:
    """A running `cq api` whose tenants each have a key; and the model its worker serves."""

    url: str
    model: str
    keys: dict[str, str]

    def openai(self, tenant: str) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=self.keys[tenant], max_retries=0, timeout=120
        )

    def http(self, tenant: str) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def input_file(self, tenant: str, name: str = "in.jsonl") -> str:
        """Upload a one-request batch input as ``tenant``; return its id."""
        line = {
            "custom_id": "only",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": self.model, "prompt": "Once upon a time", "max_tokens": 2},
        }
        data = json.dumps(line).encode()
        return self.openai(tenant).files.create(file=(name, data), purpose="batch").id


@pytest.fixture(scope="module")
def files_api(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FilesApi]:
    run = uuid.uuid4().hex[:8]
    keys = {tenant: f"key-{tenant}-{run}" for tenant in TENANTS}
    entries = ",".join(f"{tenant}-{run}:{key}" for tenant, key in keys.items())
    log = tmp_path_factory.mktemp("api-files") / "api.log"
    process, url = start_api(stack, log, CQ_API_KEYS=entries)
    yield FilesApi(url=url, model=stack.settings.model, keys=keys)
    process.terminate()
    process.wait(30)


def test_files_list_orders_pages_and_filters(files_api: FilesApi) -> None:
    lister, other = files_api.openai("lister"), files_api.openai("other")
    # Given five uploads of one tenant's and one of another's
    ids = [files_api.input_file("lister", f"in-{n}.jsonl") for n in range(5)]
    theirs = files_api.input_file("other")
    # Then the list is the tenant's own, newest first by default, with OpenAI's fields
    listed = lister.files.list()
    assert [f.id for f in listed.data] == ids[::-1] and listed.has_more is False
    assert [f.filename for f in listed.data] == [f"in-{n}.jsonl" for n in range(4, -1, -1)]
    assert all(f.purpose == "batch" and f.bytes > 0 and f.object == "file" for f in listed.data)
    assert [f.id for f in lister.files.list(order="asc").data] == ids
    # and a page of two has more; the client follows `after` across the pages
    first = lister.files.list(limit=2)
    assert [f.id for f in first.data] == ids[:2:-1] and first.has_more is True
    assert [f.id for f in lister.files.list(limit=2)] == ids[::-1]
    assert [f.id for f in lister.files.list(limit=2, order="asc")] == ids
    assert [f.id for f in lister.files.list(limit=2, after=ids[1], order="asc").data] == ids[2:4]
    assert [f.id for f in lister.files.list(after=ids[1]).data] == [ids[0]]
    # and the raw page carries OpenAI's first_id and last_id
    with files_api.http("lister") as http:
        page = http.get("/v1/files", params={"limit": 2, "after": ids[4]}).json()
        assert page["object"] == "list" and page["has_more"] is True
        assert (page["first_id"], page["last_id"]) == (ids[3], ids[2])
        # and bad parameters are a 400 naming the field; another tenant's id is an unknown one
        for params, field in [
            ({"limit": 0}, "limit"),
            ({"limit": 10_001}, "limit"),
            ({"order": "sideways"}, "order"),
            ({"after": theirs}, "after"),
            ({"after": "file-nope"}, "after"),
        ]:
            assert_error(http.get("/v1/files", params=params), 400, field, field)
    # and purpose filters
    assert [f.id for f in lister.files.list(purpose="batch")] == ids[::-1]
    assert list(lister.files.list(purpose="batch_output")) == []
    # and the other tenant sees only its own
    assert [f.id for f in other.files.list()] == [theirs]
    with pytest.raises(openai.BadRequestError):
        other.files.list(after=ids[0])


def test_files_delete_then_retrieve_is_not_found(files_api: FilesApi) -> None:
    deleter, other = files_api.openai("deleter"), files_api.openai("other")
    # Given a file a batch was made from, and one more
    used, kept = files_api.input_file("deleter"), files_api.input_file("deleter")
    batch = deleter.batches.create(
        input_file_id=used, endpoint="/v1/completions", completion_window="24h"
    )
    # When another tenant deletes them: 404, exactly as for an id that does not exist
    with files_api.http("other") as http:
        for file_id in (used, kept):
            theirs, unknown = http.delete(f"/v1/files/{file_id}"), http.delete("/v1/files/file-x")
            assert_error(theirs, 404, "id", file_id)
            assert theirs.json()["error"]["code"] == unknown.json()["error"]["code"]
    with pytest.raises(openai.NotFoundError):
        other.files.delete(used)
    assert deleter.files.retrieve(used).id == used
    # When its tenant deletes the used one
    deleted = deleter.files.delete(used)
    # Then it is gone: retrieve, download and a second delete are 404, the list lacks it
    assert (deleted.id, deleted.deleted, deleted.object) == (used, True, "file")
    with pytest.raises(openai.NotFoundError):
        deleter.files.retrieve(used)
    with pytest.raises(openai.NotFoundError):
        deleter.files.content(used)
    with pytest.raises(openai.NotFoundError):
        deleter.files.delete(used)
    assert [f.id for f in deleter.files.list()] == [kept]
    # and its batch runs on: it read its input when it was made
    done = until(lambda: (b := deleter.batches.retrieve(batch.id)).status == "completed" and b)
    assert done.output_file_id is not None and done.input_file_id == used
    output = json.loads(deleter.files.content(done.output_file_id).text)
    assert output["custom_id"] == "only" and output["response"]["status_code"] == 200
    # and the batch's output file, made from its jobs, is not listed and cannot be deleted
    assert [f.id for f in deleter.files.list()] == [kept]
    with files_api.http("deleter") as http:
        refused = http.delete(f"/v1/files/{done.output_file_id}")
    assert_error(refused, 400, "id", "cannot be deleted")
    assert refused.json()["error"]["code"] == "file_not_deletable"
    assert deleter.files.retrieve(done.output_file_id).purpose == "batch_output"
    # while another tenant's delete of it is a plain 404
    with pytest.raises(openai.NotFoundError):
        other.files.delete(done.output_file_id)


def test_batches_list_pages_newest_first(files_api: FilesApi) -> None:
    batcher, other = files_api.openai("batcher"), files_api.openai("other")
    # Given five batches of one tenant's (all from one input file) and one of another's
    input_id = files_api.input_file("batcher")
    ids = [
        batcher.batches.create(
            input_file_id=input_id,
            endpoint="/v1/completions",
            completion_window="24h",
            metadata={"n": str(n)},
        ).id
        for n in range(5)
    ]
    theirs = other.batches.create(
        input_file_id=files_api.input_file("other"),
        endpoint="/v1/completions",
        completion_window="24h",
    ).id
    for batch_id in ids:
        until(lambda b=batch_id: batcher.batches.retrieve(b).status == "completed")
    # Then the list is the tenant's own, newest first, each batch as retrieve shows it
    listed = batcher.batches.list()
    assert [b.id for b in listed.data] == ids[::-1] and listed.has_more is False
    for batch in listed.data:
        assert batch == batcher.batches.retrieve(batch.id)
    assert [b.metadata for b in listed.data] == [{"n": str(n)} for n in range(4, -1, -1)]
    # and pages of two follow `after` to the end
    first = batcher.batches.list(limit=2)
    assert [b.id for b in first.data] == ids[:2:-1] and first.has_more is True
    assert [b.id for b in batcher.batches.list(limit=2)] == ids[::-1]
    assert [b.id for b in batcher.batches.list(limit=2, after=ids[3]).data] == ids[2:0:-1]
    assert batcher.batches.list(after=ids[0]).data == []
    with files_api.http("batcher") as http:
        page = http.get("/v1/batches", params={"limit": 1}).json()
        assert (page["first_id"], page["last_id"], page["has_more"]) == (ids[4], ids[4], True)
        # and bad parameters are a 400 naming the field; another tenant's id is an unknown one
        for params, field in [
            ({"limit": 0}, "limit"),
            ({"limit": 101}, "limit"),
            ({"after": theirs}, "after"),
            ({"after": "batch_nope"}, "after"),
        ]:
            assert_error(http.get("/v1/batches", params=params), 400, field, field)
    # and the other tenant sees only its own
    assert [b.id for b in other.batches.list()] == [theirs]
    with pytest.raises(openai.BadRequestError):
        other.batches.list(after=ids[0])
