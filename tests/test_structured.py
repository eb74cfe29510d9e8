"""Structured outputs: JSON schemas and GBNF grammars through the official openai SDK and
llama.cpp's /completion, the output checked by independent validators (jsonschema, re).

The model is a parameter: the schemas are meant for the built-in model too, and any model must
give output that validates (a tiny model's content is odd, but valid).
"""

from __future__ import annotations

import asyncio
import json
import re
from enum import StrEnum
from pathlib import Path

import jsonschema
import pytest
from pydantic import BaseModel, Field
from tiller.engine.tokenizer import SpmTokenizer
from tiller.server.app import ServerConfig, create_app
from tiller.server.constraints import MaskBatch, Vocabulary, json_schema_grammar

from tests.test_server import GOLDEN_TEXT, post
from tiller import BUILTIN_MODEL

# (model, tokenizer) files under the shared models folder
# NOTE: every schema bounds what it lets a model write (string lengths, array sizes, integer
# ranges, multipleOf for numbers): nothing in JSON makes a model close a string or stop adding
# digits, and a tiny model happily writes forever where the grammar lets it.
# (model, tokenizer) from ../shared/models; None: tiller's built-in model and its own vocabulary
MODELS: list[tuple[str, str | None]] = [("stories260K.bin", "tok512.bin"),
                                        (BUILTIN_MODEL.name, None)]

Short = {"type": "string", "maxLength": 12}
SCHEMAS: list[dict] = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
     "additionalProperties": False},
    {"type": "object", "properties": {"name": Short}, "required": ["name"],
     "additionalProperties": False},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
     "required": ["n"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
     "required": ["color"], "additionalProperties": False},
    {"type": "object", "properties": {"x": {"type": "integer", "minimum": -50, "maximum": 50},
                                      "y": {"type": "integer", "minimum": 100,
                                            "maximum": 999}},
     "required": ["x", "y"], "additionalProperties": False},
    {"type": "object", "properties": {"name": Short, "age": {"type": "integer", "minimum": 0,
                                                              "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": Short,
                                               "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"scores": {"type": "array", "items": {
        "type": "integer", "minimum": 1, "maximum": 5}, "maxItems": 4}},
     "required": ["scores"], "additionalProperties": False},
    {"type": "object", "properties": {"p": {"type": "number", "minimum": 0, "maximum": 1,
                                            "multipleOf": 0.25}},
     "required": ["p"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"const": "story"}, "title": Short},
     "required": ["kind", "title"], "additionalProperties": False},
    {"type": "object", "properties": {"maybe": {"anyOf": [{"type": "null"},
                                                          {"type": "integer", "minimum": 0,
                                                           "maximum": 9}]}},
     "required": ["maybe"], "additionalProperties": False},
    {"type": "object", "properties": {"author": {
        "type": "object", "properties": {"first": Short, "last": Short},
        "required": ["first", "last"], "additionalProperties": False}},
     "required": ["author"], "additionalProperties": False},
    {"type": "object", "properties": {"points": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                         "y": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["x", "y"], "additionalProperties": False}}},
     "required": ["points"], "additionalProperties": False},
    {"type": "object", "properties": {"date": {"type": "string",
                                               "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}},
     "required": ["date"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"enum": ["yes", "no", 1, None]},
                                      "why": Short},
     "required": ["answer", "why"], "additionalProperties": False},
    {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 2, "maxItems": 5},
    {"type": "object", "properties": {
        "hero": {"$ref": "#/$defs/person"}, "friends": {
            "type": "array", "items": {"$ref": "#/$defs/person"}, "maxItems": 2}},
     "required": ["hero", "friends"], "additionalProperties": False,
     "$defs": {"person": {"type": "object", "properties": {
         "name": Short, "mood": {"enum": ["happy", "sad"]}},
         "required": ["name", "mood"], "additionalProperties": False}}},
    {"type": "object", "properties": {"shape": {"oneOf": [
        {"type": "object", "properties": {"circle": {"type": "integer", "minimum": 1,
                                                     "maximum": 99}},
         "required": ["circle"], "additionalProperties": False},
        {"type": "object", "properties": {"square": {"type": "integer", "minimum": 1,
                                                     "maximum": 99}},
         "required": ["square"], "additionalProperties": False}]}},
     "required": ["shape"], "additionalProperties": False},
    {"type": "object", "properties": {
        "title": Short, "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "rating": {"type": "number", "minimum": 0, "maximum": 10, "multipleOf": 0.5},
        "genres": {"type": "array", "items": {"enum": ["fable", "myth", "tale"]},
                   "minItems": 1, "maxItems": 2},
        "meta": {"type": "object", "properties": {
            "draft": {"type": "boolean"}, "pages": {"type": "integer", "minimum": 1,
                                                    "maximum": 500}},
            "required": ["draft", "pages"], "additionalProperties": False}},
     "required": ["title", "year", "rating", "genres", "meta"], "additionalProperties": False},
    {"type": "object", "properties": {"grid": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "maxItems": 3, "items": {"type": "integer", "minimum": 0,
                                                  "maximum": 1}}}},
     "required": ["grid"], "additionalProperties": False},
]


class Mood(StrEnum):
    happy = "happy"
    sad = "sad"


class Pet(BaseModel):
    name: str = Field(max_length=10)
    legs: int = Field(ge=0, le=8)


class Character(BaseModel):
    """The openai SDK's parse() turns this into a strict schema and the reply back into it."""

    name: str = Field(max_length=12)
    mood: Mood
    age: int = Field(ge=1, le=99)
    pets: list[Pet] = Field(max_length=2)


@pytest.fixture(scope="module", params=MODELS, ids=[m for m, _ in MODELS])
def config(request, shared_models: Path, tmp_path_factory) -> ServerConfig:
    model_file, tokenizer_file = request.param
    if tokenizer_file is None:
        return ServerConfig(model_path=BUILTIN_MODEL, parallel=8, token_budget=64,
                            steering_dir=tmp_path_factory.mktemp("steering"))
    return ServerConfig(model_path=shared_models / model_file,
                        tokenizer_path=shared_models / tokenizer_file, parallel=8,
                        token_budget=64, steering_dir=tmp_path_factory.mktemp("steering"))


@pytest.fixture
async def sdk(aiohttp_server, config, model):
    openai = pytest.importorskip("openai")
    server = await aiohttp_server(create_app(config, model=model))
    return openai.AsyncOpenAI(base_url=f"http://{server.host}:{server.port}/v1",
                              api_key="unused", max_retries=0)


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema,
                                                   "strict": True}}


# the openai SDK ----------------------------------------------------------------------------------

@pytest.mark.parametrize("index", range(len(SCHEMAS)))
async def test_sdk_json_schema_output_validates(sdk, index: int):
    schema = SCHEMAS[index]
    jsonschema.Draft202012Validator.check_schema(schema)
    seeds = (index, index + 100)
    replies = await asyncio.gather(*(sdk.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "Tell me a story as JSON."}],
        response_format=json_schema_format(schema), max_tokens=400, seed=seed,
        temperature=0.8) for seed in seeds))
    for reply in replies:
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)


async def test_sdk_parse_with_a_pydantic_model(sdk):
    for seed in range(3):
        completion = await sdk.beta.chat.completions.parse(
            model="any", messages=[{"role": "user", "content": "Describe a character."}],
            response_format=Character, max_tokens=400, seed=seed)
        message = completion.choices[0].message
        assert completion.choices[0].finish_reason == "stop"
        assert isinstance(message.parsed, Character)  # the SDK validated it with pydantic
        jsonschema.validate(json.loads(message.content), Character.model_json_schema())


async def test_completions_and_streaming_take_response_format(sdk):
    schema = SCHEMAS[5]
    reply = await sdk.completions.create(model="any", prompt="Once upon a time", max_tokens=200,
                                         seed=1, extra_body={"response_format":
                                                             json_schema_format(schema)})
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].text), schema)
    stream = await sdk.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "hi"}], stream=True, seed=2,
        response_format=json_schema_format(schema), max_tokens=200)
    text, finish = "", None
    async for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads(text), schema)


async def test_same_seed_same_output_and_choices_differ(client):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 300, "seed": 7,
            "n": 3, "response_format": json_schema_format(SCHEMAS[18])}
    first, again = await asyncio.gather(post(client, "/v1/chat/completions", body),
                                        post(client, "/v1/chat/completions", body))
    texts = [c["message"]["content"] for c in first["choices"]]
    assert texts == [c["message"]["content"] for c in again["choices"]]
    assert len(set(texts)) > 1  # seed + i per choice, as unconstrained
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMAS[18])


async def test_unconstrained_neighbours_are_untouched(client):
    """A greedy request batched with constrained ones gives what it gives alone, bit for bit
    (and, on stories260K, the golden story)."""
    free = {"prompt": "Once upon a time", "max_tokens": 30, "temperature": 0, "logprobs": 1}
    alone = await post(client, "/v1/completions", free)
    constrained = [post(client, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "seed": s,
        "response_format": json_schema_format(SCHEMAS[12])}) for s in range(4)]
    *_, batched = await asyncio.gather(*constrained, post(client, "/v1/completions", free))
    assert batched["choices"][0] == alone["choices"][0]  # text and every logprob
    if "stories260K" in alone["model"]:
        assert alone["choices"][0]["text"].startswith(GOLDEN_TEXT[:40])


async def test_json_object_and_llama_json_schema_fields(client):
    schema = SCHEMAS[3]
    body = await post(client, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50,
        "response_format": {"type": "json_object", "schema": schema}})
    jsonschema.validate(json.loads(body["choices"][0]["message"]["content"]), schema)
    body = await post(client, "/v1/completions", {"prompt": "Once", "max_tokens": 50,
                                                  "json_schema": schema})
    jsonschema.validate(json.loads(body["choices"][0]["text"]), schema)
    body = await post(client, "/completion", {"prompt": "Once", "n_predict": 50,
                                              "json_schema": schema})
    assert body["stop_type"] == "eos"
    jsonschema.validate(json.loads(body["content"]), schema)
    # any object: a tiny model may not close it in time, but what it writes is an object
    body = await post(client, "/v1/completions", {"prompt": "Once", "max_tokens": 40,
                                                  "response_format": {"type": "json_object"}})
    assert body["choices"][0]["text"].startswith("{")
    body = await post(client, "/v1/completions", {"prompt": "Once", "max_tokens": 5,
                                                  "response_format": {"type": "text"}})
    assert body["choices"][0]["finish_reason"] == "length"


# GBNF through /completion ------------------------------------------------------------------------

GBNF = r'''
root   ::= answer " because " reason "."
answer ::= "yes" | "no" | "maybe"
reason ::= word (" " word){0,5}
word   ::= [a-z]{1,8}
'''
GBNF_RE = re.compile(r"(yes|no|maybe) because [a-z]{1,8}( [a-z]{1,8}){0,5}\.")


@pytest.mark.parametrize("stream", [False, True])
async def test_gbnf_grammar_through_completion(client, stream: bool):
    for seed in range(4):
        response = await client.post("/completion", json={
            "prompt": "Once upon a time", "n_predict": 120, "grammar": GBNF, "seed": seed,
            "stream": stream, "ignore_eos": True})
        assert response.status == 200
        if stream:
            events = [json.loads(line[6:]) async for line in response.content
                      if line.startswith(b"data: ")]
            content, final = "".join(e["content"] for e in events), events[-1]
        else:
            final = await response.json()
            content = final["content"]
        assert GBNF_RE.fullmatch(content), content
        assert final["stop_type"] == "eos"


async def test_llguidance_lark_grammar_and_grammar_on_openai_routes(client):
    lark = '%llguidance {}\nstart: "The " ("cat" | "dog") " sat."'
    body = await post(client, "/completion", {"prompt": "Once", "grammar": lark, "seed": 3})
    assert body["content"] in ("The cat sat.", "The dog sat.")
    body = await post(client, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "grammar": 'root ::= "ok" | "no"'})
    assert body["choices"][0]["message"]["content"] in ("ok", "no")
    assert body["choices"][0]["finish_reason"] == "stop"


# errors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", {"response_format": json_schema_format({"type": "nope"})},
     "response_format"),
    ("/v1/chat/completions", {"response_format": json_schema_format(
        {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}})},
     "response_format"),
    ("/v1/completions", {"response_format": {"type": "json_schema",
                                             "json_schema": {"name": "x", "schema": []}}},
     None),
    ("/v1/completions", {"response_format": {"type": "json_schema"}}, None),
    ("/completion", {"grammar": 'root ::= ("yes" | "no"'}, "grammar"),
    ("/completion", {"grammar": "root ::= undefined-rule"}, "grammar"),
    ("/completion", {"json_schema": {"type": "object", "minProperties": "x"}}, "json_schema"),
    ("/completion", {"json_schema": {"type": "array", "uniqueItems": True}}, "json_schema"),
    ("/v1/completions", {"grammar": 'root ::= "a"', "json_schema": {"type": "object"}},
     "json_schema"),
])
async def test_invalid_schema_or_grammar_is_a_400_naming_it(client, path, body, param):
    prompt = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path \
        else {"prompt": "Once"}
    error = (await post(client, path, {**prompt, **body}, status=400))["error"]
    if param is not None:
        assert error["param"] == param and error["message"].startswith(param), error
    else:  # refused by the body's validation, which names the field in its message
        assert "response_format" in error["message"], error
    assert (await client.get("/health")).status == 200


async def test_a_broken_matcher_fails_its_request_alone(client, model, monkeypatch):
    good = {"prompt": "Once", "n_predict": 60, "grammar": GBNF, "seed": 1}
    alone = (await post(client, "/completion", good))["content"]
    real = model.vocabulary.constraint

    def broken(spec):
        constraint = real(spec)
        if spec is not None and "broken" in spec.grammar:
            # a refused token leaves the matcher in its error state, where it allows nothing
            assert not constraint.matcher.consume_token(
                model.tokenizer.encode_continuation("x")[0])
        return constraint

    monkeypatch.setattr(model.vocabulary, "constraint", broken)
    others = [asyncio.create_task(post(client, "/completion", good)) for _ in range(3)]
    error = (await post(client, "/completion", {"prompt": "Once", "grammar": 'root ::= "broken"'},
                        status=500))["error"]
    assert "sampling this request failed" in error["message"]
    for task in others:
        assert (await task)["content"] == alone
    assert model.engine.cache.used_blocks == 0


# the tokenizer bridge ----------------------------------------------------------------------------

def test_bridge_sees_each_token_as_decoded_text(model):
    tok = model.tokenizer
    ll = model.vocabulary.ll_tokenizer()
    assert ll.vocab_size == model.engine.config.vocab_size
    assert set(ll.eos_tokens) == set(tok.end_ids)
    text = 'so {"name": "Tim", "age": 3}'
    ids = tok.encode(text, bos=False)
    assert ll.decode_bytes(ids[1:]) == b"".join(tok.piece_bytes(i) for i in ids[1:])
    if isinstance(tok, SpmTokenizer):  # no dummy prefix in the middle of a text
        assert tok.decode(tok.encode_continuation("{")) == "{"
        assert tok.piece_bytes(tok.encode_continuation("{")[0]) == b"{"


def test_a_canonical_tokenization_is_accepted_and_ends_at_eos(model):
    tok = model.tokenizer
    schema = SCHEMAS[5]
    constraint = model.vocabulary.constraint(json_schema_grammar(schema, "json_schema"))
    assert constraint is not None
    masks = MaskBatch()
    for token in tok.encode_continuation('{"name": "Tim", "age": 3}'):
        (allowed,) = masks.compute([constraint])
        assert allowed[token]
        constraint.consume(token)
    (allowed,) = masks.compute([constraint])
    assert allowed[tok.eos_id] and allowed.sum() == 1 + (tok.eos_id != tok.eot_id
                                                        and tok.eot_id is not None)
    with pytest.raises(ValueError, match="refused"):
        constraint.consume(tok.encode_continuation("x")[0])


def test_vocabulary_is_built_once(model):
    other = Vocabulary(model.tokenizer, model.engine.config.vocab_size)
    assert other.ll_tokenizer() is other.ll_tokenizer()
