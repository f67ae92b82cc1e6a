"""The Responses API for real: a real worker, a real `cq api`, the official `openai` client.

Every response is a chat job on the same queue, worker and database; what it answers
is checked against the tiny model called directly on the chat-templated conversation.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest

from db import JobStatus
from producer import CompletionClient, JobNotFound
from tests.conftest import Stack, until
from tests.integration.test_api import KEY, Api, serving
from tests.integration.test_cli import cq
from tests.integration.test_streaming import LONG_REPLY
from tests.reference import Reference

pytestmark = pytest.mark.timeout(300)

OTHER_KEY = "responses-other-key"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "mood": {"enum": ["happy", "sad", "calm"]},
    },
    "required": ["name", "mood"],
    "additionalProperties": False,
}

#: A format whose document runs long: a job under it generates for seconds on the slow worker.
LONG_FORMAT = {"type": "json_schema", **LONG_REPLY["json_schema"]}  # type: ignore[dict-item]


@pytest.fixture(scope="module")
def api(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    log = tmp_path_factory.mktemp("responses-api") / "api.log"
    with serving(stack, log, CQ_API_KEYS=f"{OTHER_KEY},{KEY}") as api:
        yield api


def other(api: Api) -> openai.OpenAI:
    """The official client of another tenant (another key)."""
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key=OTHER_KEY, max_retries=0, timeout=60)


def job_id(response_id: str) -> uuid.UUID:
    """The job of a response: ``resp_`` and its id's hex."""
    assert response_id.startswith("resp_")
    return uuid.UUID(hex=response_id.removeprefix("resp_"))


def greedy(reference: Reference, messages: list[dict[str, str]], budget: int) -> tuple[str, int]:
    """The tiny model's greedy reply to ``messages`` and how many tokens it took."""
    return reference.greedy_ids(reference.chat_ids(messages), budget)


def test_plain_and_instructions_with_messages_equal_the_greedy_reply(
    api: Api, stack: Stack, client: CompletionClient, reference: Reference
) -> None:
    oai = api.openai()
    # When a plain string input is answered greedily
    plain = oai.responses.create(
        model=api.model, input="Where does the river run?", max_output_tokens=12, temperature=0
    )
    # Then its text is the greedy reply to that one user message, with its token counts
    asked = [{"role": "user", "content": "Where does the river run?"}]
    text, tokens = greedy(reference, asked, 12)
    assert plain.object == "response" and plain.model == api.model
    assert plain.output_text == text
    assert plain.status == ("incomplete" if tokens == 12 else "completed")
    assert plain.usage is not None and plain.usage.output_tokens == tokens
    assert plain.usage.input_tokens == len(reference.chat_ids(asked))
    assert plain.usage.total_tokens == plain.usage.input_tokens + tokens
    # and it is a job like any, under the id the response names
    job = client.get(job_id(plain.id))
    assert job.status is JobStatus.SUCCEEDED and job.text == text and job.messages == asked
    shown = json.loads(cq(stack, "status", plain.id).stdout)
    assert shown["id"] == str(job.id) and shown["status"] == "succeeded"

    # When instructions come with message items (a developer message, text parts)
    items: Any = [
        {"role": "developer", "content": "Answer in one short sentence."},
        {"role": "user", "content": "Tell me about the river."},
        {"role": "assistant", "content": "The river runs past the old mill."},
        {"role": "user", "content": [{"type": "input_text", "text": "And then?"}]},
    ]
    instructed = oai.responses.create(
        model=api.model,
        instructions="You are a calm narrator.",
        input=items,
        max_output_tokens=10,
        temperature=0,
        metadata={"topic": "river"},
    )
    # Then the instructions come first, as a system message, then the items as given
    rendered = [
        {"role": "system", "content": "You are a calm narrator."},
        {"role": "system", "content": "Answer in one short sentence."},
        {"role": "user", "content": "Tell me about the river."},
        {"role": "assistant", "content": "The river runs past the old mill."},
        {"role": "user", "content": "And then?"},
    ]
    assert instructed.output_text == greedy(reference, rendered, 10)[0]
    assert instructed.instructions == "You are a calm narrator."
    assert instructed.metadata == {"topic": "river"}
    assert client.get(job_id(instructed.id)).messages == rendered


def test_json_schema_output_validates(api: Api) -> None:
    oai = api.openai()
    # When the text format is a JSON schema
    done = oai.responses.create(
        model=api.model,
        input="Describe a person.",
        max_output_tokens=80,
        temperature=0,
        text={"format": {"type": "json_schema", "name": "person", "schema": PERSON}},
    )
    # Then the output parses and validates, and the format is echoed back
    assert done.status == "completed"
    jsonschema.validate(json.loads(done.output_text), PERSON)
    assert done.text is not None and done.text.format is not None
    assert done.text.format.type == "json_schema"


def test_background_create_then_retrieve_equals_the_waited_text(
    api: Api, client: CompletionClient
) -> None:
    oai = api.openai()
    asked = {"model": api.model, "input": "Once upon a time", "max_output_tokens": 10}
    waited = oai.responses.create(**asked, temperature=0)
    # When the same greedy response is created in the background
    started = oai.responses.create(**asked, temperature=0, background=True)
    # Then it answers at once, queued, and retrieving it ends with the same text
    assert started.status == "queued" and started.background is True
    assert started.output == []
    done = until(
        lambda: (
            (r := oai.responses.retrieve(started.id)).status not in ("queued", "in_progress") and r
        )
    )
    assert done.output_text == waited.output_text
    assert done.status == waited.status and done.usage == waited.usage
    assert client.get(job_id(done.id)).lane == "interactive"


def test_cancel_a_running_background_response(
    api: Api, client: CompletionClient, slow_model: str
) -> None:
    oai = api.openai()
    # Given a long background response on the slowed worker, running with some text
    started = oai.responses.create(
        model=slow_model,
        input="The queue takes a job",
        max_output_tokens=160,
        temperature=0,
        text={"format": LONG_FORMAT},  # type: ignore[typeddict-item]
        background=True,
    )
    running = until(
        lambda: (
            (r := oai.responses.retrieve(started.id)).status == "in_progress"
            and r.output_text
            and r
        ),
        timeout_s=60,
    )
    assert running.output[0].status == "in_progress"  # type: ignore[union-attr]
    # When it is cancelled
    cancelled = oai.responses.cancel(started.id)
    # Then it ends cancelled, its job too, keeping the text generated up to then
    assert cancelled.status == "cancelled"
    job = until(lambda: (j := client.get(job_id(started.id))).choices and j, timeout_s=30)
    assert job.status is JobStatus.CANCELLED
    assert 0 < job.choices[0].completion_tokens < 160
    assert oai.responses.retrieve(started.id).output_text == job.text
    # and cancelling it again answers it as it is; cancelling a completed one is a 409
    assert oai.responses.cancel(started.id).status == "cancelled"
    done = oai.responses.create(model=api.model, input="Hello", max_output_tokens=2)
    with pytest.raises(openai.ConflictError):
        oai.responses.cancel(done.id)


def test_streamed_deltas_equal_the_greedy_text(
    api: Api, reference: Reference, slow_model: str
) -> None:
    oai = api.openai()
    asked = [{"role": "user", "content": "Where does the river run?"}]
    text, tokens = greedy(reference, asked, 24)
    # When a greedy response is streamed (from the slowed worker: its steps come one by
    # one, where the fast one's may all land before the API reads the first)
    stream = oai.responses.create(
        model=slow_model, input=asked, max_output_tokens=24, temperature=0, stream=True
    )  # type: ignore[call-overload]
    events = list(stream)
    kinds = [event.type for event in events]
    # Then the typed events come in OpenAI's order, and the deltas join into the greedy text
    assert kinds[0] == "response.created"
    assert kinds[1:4] == [
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    ending = "response.incomplete" if tokens == 24 else "response.completed"
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        ending,
    ]
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == text
    assert [event.sequence_number for event in events] == list(range(len(events)))
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == text and final.usage.output_tokens == tokens


def test_the_stream_helper_gives_the_final_response(api: Api, client: CompletionClient) -> None:
    oai = api.openai()
    # When the client's stream helper follows a response under a JSON schema
    with oai.responses.stream(
        model=api.model,
        input="Describe a person.",
        max_output_tokens=80,
        temperature=0,
        text={"format": {"type": "json_schema", "name": "person", "schema": PERSON}},
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    # Then its final response holds the text the deltas made, as the row does
    assert final.status == "completed" and "".join(deltas) == final.output_text
    jsonschema.validate(json.loads(final.output_text), PERSON)
    assert client.get(job_id(final.id)).text == final.output_text


def test_previous_response_id_continues_its_conversation(
    api: Api, client: CompletionClient, reference: Reference
) -> None:
    oai = api.openai()
    first = oai.responses.create(
        model=api.model,
        instructions="Answer briefly.",
        input="Tell me about the river.",
        max_output_tokens=8,
        temperature=0,
    )
    # When a response continues the first
    second = oai.responses.create(
        model=api.model,
        previous_response_id=first.id,
        input="And then?",
        max_output_tokens=8,
        temperature=0,
    )
    # Then its conversation is the first's input and output (not its instructions), then
    # the new input, and its text is the greedy reply to that
    conversation = [
        {"role": "user", "content": "Tell me about the river."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And then?"},
    ]
    assert client.get(job_id(second.id)).messages == conversation
    assert second.output_text == greedy(reference, conversation, 8)[0]
    assert second.previous_response_id == first.id and second.instructions is None
    # and its input items are its own input only
    items = oai.responses.input_items.list(second.id)
    assert [item.content[0].text for item in items.data] == ["And then?"]  # type: ignore[union-attr]
    # A response not yet completed cannot be continued
    queued = oai.responses.create(
        model=api.model, input="Hi", max_output_tokens=50, background=True
    )
    oai.responses.cancel(queued.id)
    with pytest.raises(openai.BadRequestError) as refused:
        oai.responses.create(model=api.model, previous_response_id=queued.id, input="More")
    assert refused.value.param == "previous_response_id"


def test_input_items_pages_and_delete(api: Api, client: CompletionClient) -> None:
    oai = api.openai()
    given: Any = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hi!"}]},
        {"role": "user", "content": "How are you?"},
    ]
    done = oai.responses.create(model=api.model, input=given, max_output_tokens=2)
    # When its input items are listed: newest first by default, or in order, page by page
    newest_first = oai.responses.input_items.list(done.id)
    in_order = oai.responses.input_items.list(done.id, order="asc", limit=3)
    every = list(oai.responses.input_items.list(done.id, order="asc", limit=1))
    # Then they are the items given, with their roles and text
    texts = ["Be kind.", "Hello", "Hi!", "How are you?"]

    def text_of(item: Any) -> str:
        return str(item.content[0].text)

    assert [text_of(i) for i in newest_first.data] == texts[::-1]
    assert [text_of(i) for i in in_order.data] == texts[:3] and in_order.has_more
    assert [text_of(i) for i in every] == texts
    assert [i.role for i in every] == ["system", "user", "assistant", "user"]
    assert every[2].content[0].type == "output_text"  # type: ignore[union-attr]
    # When the response is deleted
    assert oai.responses.delete(done.id) is None
    # Then it and its job are gone
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(done.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.input_items.list(done.id)
    with pytest.raises(JobNotFound):
        client.get(job_id(done.id))


def test_a_batch_of_responses_lines(
    api: Api, client: CompletionClient, reference: Reference
) -> None:
    oai = api.openai()
    asked = ["The weather", "Where does the river run?"]
    lines = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/responses",
            "body": {"model": api.model, "input": text, "max_output_tokens": 6, "temperature": 0},
        }
        for i, text in enumerate(asked)
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    uploaded = oai.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    # When a batch runs /v1/responses lines
    batch = oai.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/responses", completion_window="24h"
    )
    done = until(lambda: (b := oai.batches.retrieve(batch.id)).status == "completed" and b)
    # Then each output line holds a response, as the endpoint answers it, in the batch lane
    assert done.request_counts is not None and done.request_counts.completed == 2
    assert done.output_file_id is not None
    output = [json.loads(line) for line in oai.files.content(done.output_file_id).text.splitlines()]
    by_id = {line["custom_id"]: line for line in output}
    for i, text in enumerate(asked):
        body = by_id[f"line-{i}"]["response"]["body"]
        assert body["object"] == "response"
        expected = greedy(reference, [{"role": "user", "content": text}], 6)[0]
        assert body["output"][0]["content"][0]["text"] == expected
        assert oai.responses.retrieve(body["id"]).output_text == expected
        assert client.get(job_id(body["id"])).lane == "batch"


def test_another_tenants_response_is_a_404_on_every_route(api: Api) -> None:
    mine, theirs = api.openai(), other(api)
    done = mine.responses.create(model=api.model, input="Hello", max_output_tokens=2)
    # When another tenant names it on each route that takes a response id
    attempts = [
        lambda: theirs.responses.retrieve(done.id),
        lambda: theirs.responses.cancel(done.id),
        lambda: theirs.responses.delete(done.id),
        lambda: theirs.responses.input_items.list(done.id),
    ]
    for attempt in attempts:
        with pytest.raises(openai.NotFoundError):
            attempt()
    with pytest.raises(openai.NotFoundError) as continued:
        theirs.responses.create(model=api.model, previous_response_id=done.id, input="More")
    assert continued.value.param == "previous_response_id"
    # Then it is untouched, and still its own tenant's
    assert mine.responses.retrieve(done.id).output_text == done.output_text


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
        ({"reasoning": {"effort": "low"}}, "reasoning"),
        ({"include": ["reasoning.encrypted_content"]}, "include"),
        ({"store": False}, "store"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"background": True, "stream": True}, "stream"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0]",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input[0].content[0]",
        ),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].type"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": []}}}, "text.format"),
        ({"frequency_penalty": 1}, "frequency_penalty"),
    ],
)
def test_what_it_cannot_do_is_refused_naming_the_parameter(
    api: Api, client: CompletionClient, extra: dict[str, Any], param: str
) -> None:
    body = {"model": api.model, "input": "Hello", **extra}
    # When a response asks for something we do not do
    refused = api.http.post("/v1/responses", json=body)
    # Then it is a 400 in OpenAI's shape naming the parameter, and no job was written
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert client.list(limit=1) == []
