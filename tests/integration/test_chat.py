"""Chat, logprobs and structured output for real: a real worker, a real `cq api`, the `openai` client.

Every job here takes the same path as a prompt job (queue, worker, SQL); what
it answers is checked against the tiny model called directly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from producer import CompletionClient
from tests.conftest import Stack, until
from tests.integration.test_api import KEY, Api, start_api
from tests.reference import Reference

SYSTEM = {"role": "system", "content": "You answer in one short sentence."}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"enum": ["happy", "sad", "calm"]},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "mood", "member"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def api(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    import httpx

    log = tmp_path_factory.mktemp("chat-api") / "api.log"
    process, url = start_api(stack, log, CQ_API_KEYS=KEY)
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    yield Api(url=url, http=http, model=stack.settings.model)
    http.close()
    process.terminate()
    process.wait(30)


def test_chat_completions_equal_direct_generate_on_the_templated_prompt(
    api: Api, reference: Reference
) -> None:
    oai = api.openai()
    conversations = [
        [SYSTEM, {"role": "user", "content": "What is the weather today?"}],
        [
            {"role": "user", "content": "Tell me about the river."},
            {"role": "assistant", "content": "The river runs past the old mill."},
            {"role": "user", "content": [{"type": "text", "text": "And then?"}]},
        ],
    ]
    for messages in conversations:
        # When the official client asks for a greedy chat completion
        done = oai.chat.completions.create(
            model=api.model,
            messages=messages,
            max_tokens=12,
            temperature=0,  # type: ignore[arg-type]
        )
        # Then the reply is what a direct generate gives on the chat-templated prompt
        as_text = [
            {**m, "content": m["content"] if isinstance(m["content"], str) else "And then?"}
            for m in messages
        ]
        prompt_ids = reference.chat_ids(as_text)  # type: ignore[arg-type]
        text, tokens = reference.greedy_ids(prompt_ids, 12)
        assert done.object == "chat.completion" and done.model == api.model
        assert done.choices[0].message.role == "assistant"
        assert done.choices[0].message.content == text
        assert done.choices[0].finish_reason == ("length" if tokens == 12 else "stop")
        assert done.usage is not None
        assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (len(prompt_ids), tokens)
        assert done.system_fingerprint and done.system_fingerprint.startswith("fp_")


def test_n_seeded_choices_repeat_on_a_rerun(api: Api) -> None:
    oai = api.openai()
    messages = [{"role": "user", "content": "Once upon a time"}]

    def ask() -> list[str | None]:
        done = oai.chat.completions.create(
            model=api.model,
            messages=messages,
            max_tokens=8,
            n=3,
            seed=7,
            temperature=1.0,  # type: ignore[arg-type]
        )
        assert [c.index for c in done.choices] == [0, 1, 2]
        return [c.message.content for c in done.choices]

    first = ask()
    assert ask() == first
    assert len(set(first)) > 1  # three draws, not one copied


def test_logprobs_equal_a_direct_forward_pass(api: Api, reference: Reference) -> None:
    oai = api.openai()
    messages = [SYSTEM, {"role": "user", "content": "Where does the river run?"}]
    # When a greedy chat completion asks for logprobs with 5 alternatives
    done = oai.chat.completions.create(
        model=api.model,
        messages=messages,
        max_tokens=10,
        temperature=0,  # type: ignore[arg-type]
        logprobs=True,
        top_logprobs=5,
    )
    prompt_ids = reference.chat_ids(messages)
    generated = reference.greedy_tokens(prompt_ids, 10)
    expected = reference.log_softmax(prompt_ids, generated)
    content = done.choices[0].logprobs.content  # type: ignore[union-attr]
    # Then every token's logprob is the direct pass's log-softmax, with 5 alternatives, descending
    assert content is not None and len(content) == len(generated)
    for entry, token, row in zip(content, generated, expected, strict=True):
        assert entry.token == reference.tokenizer.decode([token])
        assert abs(entry.logprob - float(row[token])) < 1e-4
        alternatives = [a.logprob for a in entry.top_logprobs]
        assert len(alternatives) == 5 and alternatives == sorted(alternatives, reverse=True)
        assert abs(alternatives[0] - float(row.max())) < 1e-4
    # And /v1/completions answers logprobs=5 in its own shape
    prompt = "The queue takes a job and"
    legacy = oai.completions.create(
        model=api.model, prompt=prompt, max_tokens=6, temperature=0, logprobs=5
    )
    ids = reference.encode(prompt)
    tokens = reference.greedy_tokens(ids, 6)
    direct = reference.log_softmax(ids, tokens)
    got = legacy.choices[0].logprobs
    assert got is not None and got.token_logprobs is not None and got.top_logprobs is not None
    assert len(got.token_logprobs) == len(tokens)
    for chosen, top, token, row in zip(
        got.token_logprobs, got.top_logprobs, tokens, direct, strict=True
    ):
        assert abs(chosen - float(row[token])) < 1e-4
        assert len(top) == 5
    assert got.text_offset is not None and got.text_offset[0] == 0


def test_json_schema_output_always_validates(api: Api) -> None:
    oai = api.openai()
    messages = [{"role": "user", "content": "Describe a person as JSON."}]
    schema_format = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }
    for seed in range(20):
        # When the output is sampled at temperature 1.0 under a JSON schema
        done = oai.chat.completions.create(
            model=api.model,
            messages=messages,
            max_tokens=80,
            temperature=1.0,
            seed=seed,  # type: ignore[arg-type]
            response_format=schema_format,  # type: ignore[arg-type]
        )
        # Then it parses and validates, every time
        text = done.choices[0].message.content
        assert text is not None
        jsonschema.validate(json.loads(text), PERSON)
        assert done.choices[0].finish_reason == "stop"


def test_the_python_client_and_native_api_take_messages(
    api: Api, client: CompletionClient, reference: Reference
) -> None:
    messages = [SYSTEM, {"role": "user", "content": "Hello there"}]
    # When the Python client submits a chat job and the native API another
    job = client.submit(messages=messages, max_new_tokens=6, temperature=0)
    native = api.http.post(
        "/v1/jobs", json={"messages": messages, "max_new_tokens": 6, "temperature": 0}
    )
    assert native.status_code == 202, native.text
    native_id = native.json()["ids"][0]
    # Then both rows keep the messages, and reply as a direct generate does
    expected = reference.greedy_ids(reference.chat_ids(messages), 6)[0]
    done = client.wait(job.id, timeout=60)
    assert done.messages == messages and done.prompt == ""
    assert done.text == expected
    row = until(
        lambda: (j := api.http.get(f"/v1/jobs/{native_id}").json())["status"] == "succeeded" and j
    )
    assert row["messages"] == messages
    assert row["choices"][0]["text"] == expected


def test_a_batch_of_chat_lines_round_trips(api: Api, reference: Reference, tmp_path: Path) -> None:
    oai = api.openai()
    questions = {f"q-{i}": f"Question {i}: what is {i} and {i}?" for i in range(50)}
    lines = [
        {
            "custom_id": cid,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": api.model,
                "messages": [{"role": "user", "content": q}],
                "max_tokens": 4,
                "temperature": 0,
            },
        }
        for cid, q in questions.items()
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    # When the file runs as a chat batch
    uploaded = oai.files.create(file=("chat.jsonl", data), purpose="batch")
    batch = oai.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = until(lambda: (b := oai.batches.retrieve(batch.id)).status == "completed" and b, 120)
    # Then every output line is the chat completion of its own request
    assert done.request_counts is not None and done.request_counts.completed == 50
    assert done.output_file_id is not None
    output = [json.loads(line) for line in oai.files.content(done.output_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in output) == sorted(questions)
    for line in output:
        body = line["response"]["body"]
        assert body["object"] == "chat.completion"
        question = [{"role": "user", "content": questions[line["custom_id"]]}]
        expected = reference.greedy_ids(reference.chat_ids(question), 4)[0]
        assert body["choices"][0]["message"]["content"] == expected
    assert oai.batches.list().data[0].id == batch.id


def test_messages_for_a_model_without_a_chat_template_are_refused_at_once(
    api: Api, stack: Stack
) -> None:
    import redis

    from completion_queue import announce, withdraw

    # Given a live worker that announced a model whose tokenizer has no chat template
    broker = redis.Redis.from_url(stack.settings.broker_url or "")
    announce(broker, "cq1-plain@test", "plain-lm", heartbeat_s=60, chat=False)
    try:
        # When a chat completion asks for it
        refused = api.http.post(
            "/v1/chat/completions",
            json={"model": "plain-lm", "messages": [{"role": "user", "content": "Hi"}]},
        )
        # Then it is refused before anything is queued, naming the model
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == "messages"
        assert "'plain-lm' has no chat template" in refused.json()["error"]["message"]
    finally:
        withdraw(broker, "cq1-plain@test")
        broker.close()


def test_json_object_output_always_parses(api: Api) -> None:
    oai = api.openai()
    messages = [{"role": "user", "content": "Describe a person as JSON."}]
    for seed in range(20):
        # When the output is sampled at temperature 1.0 as a JSON object
        done = oai.chat.completions.create(
            model=api.model,
            messages=messages,
            max_tokens=160,
            temperature=1.0,
            seed=seed,  # type: ignore[arg-type]
            response_format={"type": "json_object"},
        )
        # Then it is one, every time
        assert isinstance(json.loads(done.choices[0].message.content or ""), dict)
        assert done.choices[0].finish_reason == "stop"
