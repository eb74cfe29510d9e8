"""Interventions and readouts over HTTP on the built-in model (f32): every route against the
numpy reference forward with the same intervention (teacher-forced on the returned tokens),
streamed chunks against whole responses, 16 different requests in one batch against their solo
runs (bitwise), and bad input as 400s naming the field."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import pytest
from tiller.engine.engine import Condition, Engine, SteeringTerm
from tiller.server.app import ServerConfig

from tests.reference import reference_forward, rmsnorm
from tests.test_engine import reference_weights
from tests.test_interventions import Case, reference
from tests.test_server import post, sse_events
from tiller import BUILTIN_MODEL


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> ServerConfig:
    return ServerConfig(model_path=BUILTIN_MODEL, dtype="f32", parallel=16, token_budget=256,
                        steering_dir=tmp_path_factory.mktemp("steering"))


@pytest.fixture(scope="module")
def offline():
    engine = Engine.load(BUILTIN_MODEL, dtype="f32", max_tokens=64)
    return engine.config, reference_weights(engine, False)


def vec(seed: int, dim: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


def decode(h: dict) -> np.ndarray:
    assert h["dtype"] == "float32"
    return np.frombuffer(base64.b64decode(h["data"]), "<f4").reshape(h["shape"])


def entries(dim: int) -> tuple[list[dict], list[SteeringTerm]]:
    """Steering entries as JSON and as the reference's terms: a scoped clamp, a norm-matched
    ablation of the prompt, a token-gated addition and a prompt-conditioned one (CAST)."""
    a, b, c, d = (vec(s, dim) for s in (1, 2, 3, 4))
    js = [
        {"direction": a.tolist(), "layer": 2, "op": "clamp", "value": 2.0, "positions": [3, 9]},
        {"direction": b.tolist(), "layer": 1, "op": "ablate", "norm_match": True,
         "positions": "prompt"},
        {"direction": c.tolist(), "layer": 3, "scale": 3.0,
         "when": {"vector": d.tolist(), "layer": 2, "threshold": 0.0, "scope": "token"}},
        {"direction": c.tolist(), "layer": 1, "scale": -2.0, "positions": "generated",
         "when": {"vector": d.tolist(), "layer": 3, "threshold": -0.5}},
    ]
    terms = [
        SteeringTerm(2, a, every_position=True, op="clamp", value=2.0, positions=(3, 9)),
        SteeringTerm(1, b, every_position=True, op="ablate", norm_match=True,
                     positions="prompt"),
        SteeringTerm(3, c, 3.0, every_position=True,
                     when=Condition(d, 2, 0.0, scope="token")),
        SteeringTerm(1, c, -2.0, every_position=True, positions="generated",
                     when=Condition(d, 3, -0.5)),
    ]
    return js, terms


READOUTS = [{"name": "mood", "layer": 2, "point": "resid_pre"},
            {"name": "mlp", "layer": -1, "point": "mlp_out"}]
HIDDEN = {"layers": [0, 3], "points": ["resid_pre", "resid_post"], "positions": "all"}


def readouts(dim: int) -> list[dict]:
    return [{**r, "vector": vec(10 + i, dim).tolist()} for i, r in enumerate(READOUTS)]


def check_against_reference(offline, prompt: list[int], out: dict, js_terms) -> None:
    config, weights = offline
    generated = out["tokens"]
    P, G = len(prompt), len(generated)
    ref, decisions, gates = reference(weights, Case(js_terms, [], prompt, generated), config)
    # greedy tokens are the reference's argmax at the positions that drew them
    assert np.argmax(ref["logits"][P - 1:P + G - 1], axis=-1).tolist() == generated
    blocks = {"resid_pre": 2, "mlp_out": config.n_layers - 1}
    for i, r in enumerate(READOUTS):
        h = ref[r["point"]][blocks[r["point"]]].astype(np.float64)
        v = vec(10 + i, config.dim).astype(np.float64)
        proj = h @ v / np.linalg.norm(v)
        cos = proj / np.linalg.norm(h, axis=-1)
        got = out["readouts"][r["name"]]
        np.testing.assert_allclose(got["projection"], proj[P - 1:P + G - 1], rtol=1e-4,
                                   atol=1e-4)
        np.testing.assert_allclose(got["cosine"], cos[P - 1:P + G - 1], atol=1e-5)
        prompt_got = out["prompt_readouts"][r["name"]]
        np.testing.assert_allclose(prompt_got["projection"], proj[:P], rtol=1e-4, atol=1e-4)
    hs = out["hidden_states"]
    gen, pre = decode(hs["generated"]), decode(hs["prompt"])
    assert gen.shape == (2, 2, G, config.dim) and pre.shape == (2, 2, P, config.dim)
    for k, point in enumerate(HIDDEN["points"]):
        for j, block in enumerate(HIDDEN["layers"]):
            np.testing.assert_allclose(gen[k, j], ref[point][block][P - 1:P + G - 1],
                                       rtol=1e-4, atol=2e-5)
            np.testing.assert_allclose(pre[k, j], ref[point][block][:P], rtol=1e-4, atol=2e-5)
    conds = {(c["entry"], c["scope"]): c for c in out["steering_conditions"]}
    assert conds[3, "prompt"]["fired"] == decisions[3]
    fired = conds[2, "token"]["fired"]
    assert fired == [bool(gates[2, p][1]) for p in range(P - 1, P + G - 1)]
    assert any(fired) or not all(fired)  # decided per token


async def test_completion_routes_equal_the_reference(client, offline):
    config, _ = offline
    js, terms = entries(config.dim)
    prompt = (await post(client, "/tokenize", {"content": "Once upon a time, a little dog",
                                               "add_special": True}))["tokens"]
    common = {"steering": js, "readouts": readouts(config.dim), "readout_prompt": True,
              "hidden_states": HIDDEN, "temperature": 0}
    out = await post(client, "/completion", {"prompt": prompt, "n_predict": 12,
                                             "return_tokens": True, **common})
    check_against_reference(offline, prompt, out, terms)
    # /v1/completions: the same tokens, readouts and states
    openai = (await post(client, "/v1/completions", {"prompt": prompt, "max_tokens": 12,
                                                     **common}))["choices"][0]
    assert openai["text"] == out["content"]
    for key in ("readouts", "prompt_readouts", "hidden_states", "steering_conditions"):
        assert openai[key] == out[key]


async def test_chat_reads_what_completion_reads_on_the_rendered_prompt(client, model, offline):
    config, _ = offline
    js, _ = entries(config.dim)
    messages = [{"role": "user", "content": "Tell me a story about a cat."}]
    common = {"steering": js, "readouts": readouts(config.dim), "hidden_states": HIDDEN,
              "temperature": 0}
    chat = (await post(client, "/v1/chat/completions",
                       {"messages": messages, "max_tokens": 10, **common}))["choices"][0]
    text = (await post(client, "/apply-template", {"messages": messages}))["prompt"]
    ids = model.tokenizer.encode(text, bos=True, special=True)  # as chat tokenizes its prompt
    plain = await post(client, "/completion", {"prompt": ids, "n_predict": 10, **common})
    assert chat["message"]["content"] == plain["content"]
    for key in ("readouts", "hidden_states", "steering_conditions"):
        assert chat[key] == plain[key]


async def test_streamed_chunks_carry_the_readings_of_their_tokens(client, offline):
    config, _ = offline
    js, _ = entries(config.dim)
    body = {"prompt": "Once upon a time", "max_tokens": 14, "temperature": 0, "steering": js,
            "readouts": readouts(config.dim), "readout_prompt": True, "hidden_states": HIDDEN}
    whole = (await post(client, "/v1/completions", body))["choices"][0]
    response = await client.post("/v1/completions", json={**body, "stream": True})
    chunks = [e["choices"][0] for e in await sse_events(response) if e != "[DONE]" and
              e["choices"]]
    carried = [c for c in chunks if "readouts" in c]
    assert len(carried) > 1
    for name in ("mood", "mlp"):
        streamed = [x for c in carried for x in c["readouts"][name]["projection"]]
        assert streamed == whole["readouts"][name]["projection"]
    states = np.concatenate([decode(c["hidden_states"]["generated"]) for c in carried], axis=2)
    np.testing.assert_array_equal(states, decode(whole["hidden_states"]["generated"]))
    last = chunks[-1]
    assert last["finish_reason"] == "length"
    assert last["prompt_readouts"] == whole["prompt_readouts"]
    assert last["hidden_states"]["prompt"] == whole["hidden_states"]["prompt"]
    assert [c for c in last["steering_conditions"]] == [
        c for c in whole["steering_conditions"] if c["scope"] == "prompt"]


def _variety(dim: int, i: int) -> list[dict]:
    """Request i's own intervention: operators, scopes and conditions in turn."""
    d = vec(100 + i, dim).tolist()
    w = vec(200 + i, dim).tolist()
    layer = 1 + i % 3
    kinds = [
        {"op": "add", "scale": 2.0},
        {"op": "ablate"},
        {"op": "clamp", "value": 1.5, "norm_match": True},
        {"op": "cap", "value": 0.0},
        {"op": "add", "scale": -3.0, "positions": "generated"},
        {"op": "ablate", "positions": "prompt"},
        {"op": "clamp", "value": -1.0, "positions": [2, 7]},
        {"op": "add", "scale": 2.5, "when": {"vector": w, "layer": layer, "threshold": 0.0,
                                             "scope": "token"}},
        {"op": "add", "scale": 2.5, "when": {"vector": w, "layer": 3, "threshold": -1.0}},
        {"op": "cap", "value": 0.5, "norm_match": True, "positions": "generated"},
    ]
    return [{"direction": d, "layer": layer, **kinds[i % len(kinds)]}]


async def test_sixteen_interventions_in_one_batch_equal_their_solo_runs(client, offline):
    config, _ = offline

    def body(i: int) -> dict:
        return {"prompt": f"Once upon a time there was a {['dog', 'cat'][i % 2]}",
                "max_tokens": 16, "temperature": 0.9, "seed": i,
                "steering": _variety(config.dim, i), "hidden_states": {"layers": [i % 4]},
                "readouts": [{"name": "a", "vector": vec(300 + i, config.dim).tolist(),
                              "layer": i % 4},
                             {"name": "b", "vector": vec(400 + i, config.dim).tolist(),
                              "layer": -1, "point": "resid_post"}]}

    solo = [(await post(client, "/v1/completions", body(i)))["choices"][0] for i in range(16)]
    together = await asyncio.gather(*(post(client, "/v1/completions", body(i))
                                      for i in range(16)))
    for alone, batched in zip(solo, together, strict=True):
        assert batched["choices"][0] == alone
    assert len({c["text"] for c in solo}) > 8  # they do differ from one another


@pytest.mark.parametrize(("change", "param", "words"), [
    (lambda d: {"steering": [{"direction": d, "layer": 1,
                              "when": {"vector": d, "layer": 1}}]}, "steering", "threshold"),
    (lambda d: {"steering": [{"direction": d, "layer": 1, "op": "twist"}]}, "steering", "op"),
    (lambda d: {"steering": [{"direction": d, "layer": 1, "positions": [4, 4]}]}, "steering",
     "empty"),
    (lambda d: {"steering": [{"direction": d, "layer": 1, "positions": [0, 100000]}]},
     "steering", "past the context"),
    (lambda d: {"readouts": [{"name": "r", "vector": d, "layer": 99}]}, "readouts", "layer"),
    (lambda d: {"readouts": [{"name": "r", "vector": d[:7], "layer": 1}]}, "readouts",
     "width"),
    (lambda d: {"steering": [{"direction": d[:7], "layer": 1}]}, "steering", "width"),
    (lambda d: {"steering": [{"direction": d, "layer": 1, "op": "clamp"}]}, "steering",
     "value"),
    (lambda d: {"steering": [{"direction": d, "layer": 1,
                              "when": {"vector": d, "layer": 3, "threshold": 0.1,
                                       "scope": "token"}}]}, "steering", "at or before"),
    (lambda d: {"hidden_states": {"layers": [12]}}, "hidden_states", "layer"),
])
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions", "/completion"])
async def test_bad_input_is_a_400_naming_the_field(client, offline, change, param, words,
                                                   route):
    config, _ = offline
    d = vec(5, config.dim).tolist()
    base = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in route else \
        {"prompt": "Once"}
    out = await post(client, route, {**base, "max_tokens": 2, **change(d)}, status=400)
    assert out["error"]["param"] == param, out
    assert words in out["error"]["message"], out


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


async def test_logit_lens_equals_the_reference(client, model, offline):
    config, weights = offline
    ids = model.tokenizer.encode("Once upon a time, there was a little dog", bos=True)
    out = await post(client, "/v1/features", {"input": ids, "layers": [1, -1],
                                              "points": ["logit_lens", "resid_post"],
                                              "positions": [2, -1], "top_k": 4})
    ref = reference_forward(weights, config, ids)
    classifier = weights.get("classifier", weights["token_embedding"])
    lens = out["logit_lens"]
    for j, block in enumerate((1, config.n_layers - 1)):
        h = ref["resid_post"][block][[2, len(ids) - 1]]
        lp = _log_softmax(rmsnorm(h, weights["final_norm"], config.norm_eps) @ classifier.T)
        want = np.argsort(-lp, axis=-1, kind="stable")[:, :4]
        assert lens["ids"][j] == want.tolist()
        np.testing.assert_allclose(lens["logprobs"][j], np.take_along_axis(lp, want, -1),
                                   atol=1e-4)
        assert lens["tokens"][j][0][0] == model.tokenizer.piece_bytes(
            int(want[0, 0])).decode("utf-8", "replace")
    # the last block's lens is the model's own next-token distribution
    np.testing.assert_allclose(lens["logprobs"][1][1], np.sort(_log_softmax(
        ref["logits"][-1]))[::-1][:4], atol=1e-4)


async def test_a_features_batch_equals_each_input_alone(client, offline):
    config, _ = offline
    d = vec(7, config.dim).tolist()
    inputs = [{"input": "Once upon a time"},
              {"input": "The cat sat", "positions": "last",
               "steering": [{"direction": d, "layer": 2, "op": "ablate"}]},
              {"input": [1, 50, 60, 70], "steering": [{"direction": d, "layer": 1,
                                                       "scale": 3.0, "positions": [1, 3]}]}]
    common = {"layers": [0, 2], "points": ["resid_pre", "mlp_out", "logit_lens"], "top_k": 3}
    batch = await post(client, "/v1/features", {"inputs": inputs, **common})
    assert len(batch["results"]) == 3
    for item, got in zip(inputs, batch["results"], strict=True):
        alone = await post(client, "/v1/features", {**item, **common})
        assert got == {k: v for k, v in alone.items() if k != "model"}
    # the second input's own steering changed its states, and only its own
    plain = await post(client, "/v1/features", {"input": "The cat sat", "positions": "last",
                                                **common})
    assert plain["data"]["mlp_out"] != batch["results"][1]["data"]["mlp_out"]
    assert batch["results"][0] == {k: v for k, v in (await post(
        client, "/v1/features", {"input": "Once upon a time", **common})).items()
        if k != "model"}


async def test_features_batch_errors_name_the_input(client):
    out = await post(client, "/v1/features", {"inputs": [{"input": "a"}, {"input": ""}]},
                     status=400)
    assert out["error"]["param"] == "inputs", out
    out = await post(client, "/v1/features", {"input": "a", "inputs": [{"input": "b"}]},
                     status=400)
    assert "not both" in out["error"]["message"]
    out = await post(client, "/v1/features", {"inputs": [{"input": "a", "positions": [9]}]},
                     status=400)
    assert out["error"]["param"] == "positions" and "9" in out["error"]["message"], out


async def test_the_python_client_gives_readings_as_numpy(client, offline):
    from tiller_client import AsyncClient

    config, _ = offline
    js, _ = entries(config.dim)
    body = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "steering": js,
            "readouts": readouts(config.dim), "readout_prompt": True, "hidden_states": HIDDEN}
    raw = (await post(client, "/v1/completions", body))["choices"][0]
    async with AsyncClient(str(client.make_url("")).rstrip("/")) as tc:
        done = await tc.complete("Once upon a time", max_tokens=8, temperature=0, steering=js,
                                 readouts=body["readouts"], readout_prompt=True,
                                 hidden_states=HIDDEN)
        r = done.choices[0].readings
        assert r is not None and r.layers == [0, 3] and r.points == HIDDEN["points"]
        np.testing.assert_array_equal(r.projection("mood"), raw["readouts"]["mood"]["projection"])
        np.testing.assert_array_equal(r.prompt_readouts["mlp"]["cosine"],
                                      raw["prompt_readouts"]["mlp"]["cosine"])
        np.testing.assert_array_equal(r.hidden_states["generated"],
                                      decode(raw["hidden_states"]["generated"]))
        assert r.hidden_states["prompt"].shape == (2, 2, 5, config.dim)
        assert r.conditions == raw["steering_conditions"]
        stream = await tc.stream_complete("Once upon a time", max_tokens=8, temperature=0,
                                          steering=js, readouts=body["readouts"])
        parts = [c.readings.projection("mood") async for c in stream if c.readings
                 and c.readings.readouts]
    np.testing.assert_array_equal(np.concatenate(parts), r.projection("mood"))


async def test_the_openapi_document_describes_the_new_fields(client):
    doc = await (await client.get("/openapi.json")).json()
    text = str(doc)
    for name in ("readouts", "readout_prompt", "hidden_states", "norm_match", "when",
                 "steering_conditions", "logit_lens", "inputs", "top_k"):
        assert f"'{name}'" in text, name
    assert "'ablate'" in text and "'cap'" in text and "'generated'" in text
