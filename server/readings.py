"""What a generation reads out besides its text: readouts, hidden states and the decisions of
conditional steering, gathered per choice in the shapes the responses carry.

A generated token's readings are those of the state it was drawn from (the position before
it: the last prompt token for the first one), so they arrive with the token. Streamed, they go
out with the chunk that carries the token's text, as chat logprobs do (text held back keeps its
tokens' entries pending; tokens a stop string cut away are reported neither streamed nor
whole). Hidden states are base64 of little-endian float32 with their shape beside them:
(len(points), len(layers), tokens, dim), like the embeddings API's base64.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from ..engine.engine import EngineError, SteeringTerm
from ..engine.forward import CAPTURE_POINTS
from ..engine.layers import normalize_block
from .errors import ApiError
from .generation import Piece
from .prepare import Choice, GenerationSpec
from .protocol import HiddenStates, ReadoutSpec
from .runner import PromptReadings
from .state import ServerState
from .steering_service import resolve_readouts


def encode_array(a: np.ndarray) -> dict[str, Any]:
    """An array as {"shape", "dtype": "float32", "data": base64 of little-endian float32}."""
    a = np.ascontiguousarray(a, dtype="<f4")
    return {"shape": list(a.shape), "dtype": "float32",
            "data": base64.b64encode(a.tobytes()).decode("ascii")}


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


@dataclass(frozen=True)
class ReadingsSpec:
    """What a request reads: readout names, hidden-state layers (as the request numbered them)
    and points, and the token conditions of its steering (request entry, steered layer)."""

    names: tuple[str, ...] = ()
    layers: tuple[int, ...] = ()
    points: tuple[str, ...] = ()
    positions: str = "generated"
    token_conditions: tuple[tuple[int, int, int], ...] = ()  # (condition index, entry, layer)
    prompt_conditions: bool = False

    @classmethod
    def of(cls, names: list[str], hidden: Any, steering: tuple[SteeringTerm, ...]
           ) -> ReadingsSpec:
        conds = [t for t in steering if t.when is not None]
        return cls(tuple(names), tuple(hidden.layers) if hidden else (),
                   tuple(hidden.points) if hidden else (),
                   hidden.positions if hidden else "generated",
                   tuple((k, t.when.label, t.layer) for k, t in enumerate(conds)
                         if t.when is not None and t.when.scope == "token"),
                   any(t.when is not None and t.when.scope == "prompt" for t in conds))

    @property
    def active(self) -> bool:
        return bool(self.names or self.layers or self.token_conditions
                    or self.prompt_conditions)


@dataclass
class ChoiceReadings:
    """One choice's readings so far; `add` returns the fragment a stream chunk carries."""

    spec: ReadingsSpec
    point_index: list[int] = field(default_factory=list)
    readouts: list[np.ndarray] = field(default_factory=list)  # (n_readouts, 2) per token
    hidden: list[np.ndarray] = field(default_factory=list)  # (points, layers, dim) per token
    gates: list[np.ndarray] = field(default_factory=list)
    prompt_readouts: list[np.ndarray] = field(default_factory=list)  # (n, R, 2) per chunk
    prompt_hidden: list[np.ndarray] = field(default_factory=list)  # (P, L, n, dim) per chunk
    pending: list[Piece] = field(default_factory=list)
    released: int = 0  # generated tokens whose readings were released

    def __post_init__(self) -> None:
        self.point_index = [CAPTURE_POINTS.index(p) for p in self.spec.points]

    def add_prompt(self, event: PromptReadings) -> None:
        if event.readouts is not None:
            self.prompt_readouts.append(event.readouts)
        if event.hidden is not None:
            self.prompt_hidden.append(event.hidden[self.point_index])

    def add(self, piece: Piece) -> dict | None:
        """Record a piece; the readings of the tokens whose text it releases (None if it
        releases no text or the request reads nothing)."""
        if not self.spec.active:
            return None
        if piece.token is not None and piece.event is not None:
            self.pending.append(piece)
        if not piece.text:
            return None
        released, self.pending = self.pending, []
        start = self.released
        self.released += len(released)
        for p in released:
            ev = p.event
            assert ev is not None
            if ev.readouts is not None:
                self.readouts.append(ev.readouts)
            if ev.hidden is not None:
                self.hidden.append(ev.hidden[self.point_index])
            if ev.gates is not None:
                self.gates.append(ev.gates)
        if not released:
            return None
        return self._body(start, len(released), final=False)

    def body(self, decisions: list[tuple[int, float, bool]]) -> dict:
        """The choice's fields of a whole response."""
        out = self._body(0, self.released, final=True)
        if self.spec.prompt_conditions or self.spec.token_conditions:
            out["steering_conditions"] = [
                {"entry": entry, "scope": "prompt", "similarity": cos, "fired": fired}
                for entry, cos, fired in decisions] + out.pop("steering_conditions", [])
        return out

    def tail(self, decisions: list[tuple[int, float, bool]]) -> dict:
        """What a stream's finishing chunk adds: the prompt's readings and decisions."""
        whole = self.body(decisions)
        out: dict[str, Any] = {}
        if "prompt_readouts" in whole:
            out["prompt_readouts"] = whole["prompt_readouts"]
        hs = whole.get("hidden_states", {})
        if "prompt" in hs:
            out["hidden_states"] = {"layers": hs["layers"], "points": hs["points"],
                                    "prompt": hs["prompt"]}
        if decisions:
            out["steering_conditions"] = [c for c in whole["steering_conditions"]
                                          if c["scope"] == "prompt"]
        return out

    def _body(self, start: int, n: int, final: bool) -> dict:
        out: dict[str, Any] = {}
        s = self.spec
        if s.names:
            rows = np.array(self.readouts[start:start + n]).reshape(-1, len(s.names), 2)
            out["readouts"] = {name: {"projection": [_finite(x) for x in rows[:, k, 0]],
                                      "cosine": [_finite(x) for x in rows[:, k, 1]]}
                               for k, name in enumerate(s.names)}
            if final and self.prompt_readouts:
                pr = np.concatenate(self.prompt_readouts)
                out["prompt_readouts"] = {
                    name: {"projection": [_finite(x) for x in pr[:, k, 0]],
                           "cosine": [_finite(x) for x in pr[:, k, 1]]}
                    for k, name in enumerate(s.names)}
        if s.layers and (final or s.positions != "prompt"):
            hs: dict[str, Any] = {"layers": list(s.layers), "points": list(s.points)}
            dim_shape = (len(s.points), len(s.layers), 0)
            if s.positions != "prompt":
                gen = self.hidden[start:start + n]
                hs["generated"] = encode_array(np.stack(gen, axis=2) if gen else
                                               np.zeros((*dim_shape, 0), np.float32))
            if final and s.positions != "generated" and self.prompt_hidden:
                hs["prompt"] = encode_array(np.concatenate(self.prompt_hidden, axis=2))
            out["hidden_states"] = hs
        if s.token_conditions:
            g = np.array(self.gates[start:start + n]).reshape(n, -1, 2) if n else \
                np.zeros((0, 0, 2))
            out["steering_conditions"] = [
                {"entry": entry, "layer": layer, "scope": "token",
                 "similarity": [_finite(x) for x in g[:, k, 0]],
                 "fired": [None if not np.isfinite(x) else bool(x) for x in g[:, k, 1]]}
                for k, entry, layer in s.token_conditions]
        return out


class Reading(Protocol):
    """A generating request's body: `readouts`, `readout_prompt`, `hidden_states`."""

    @property
    def readouts(self) -> list[ReadoutSpec]: ...

    @property
    def readout_prompt(self) -> bool: ...

    @property
    def hidden_states(self) -> HiddenStates | None: ...


async def request_readings(state: ServerState, body: Reading, steering: tuple[SteeringTerm, ...],
                           max_tokens: int) -> tuple[dict[str, Any], ReadingsSpec]:
    """What a completion reads besides its text: the GenerationRequest fields and the shape of
    the report. `max_tokens` (prompt and generated) bounds the hidden states' size."""
    model, _ = state.ready()
    readouts = await resolve_readouts(state, body.readouts)
    fields: dict[str, Any] = {"readouts": readouts, "readout_prompt": body.readout_prompt}
    hidden = body.hidden_states
    if hidden is not None:
        c = model.engine.config
        blocks = []
        for i, layer in enumerate(hidden.layers):
            try:
                blocks.append(normalize_block(layer, c.n_layers, "layer"))
            except EngineError as e:
                raise ApiError(400, f"hidden_states.layers[{i}]: {e}",
                               param="hidden_states") from e
        values = max_tokens * len(blocks) * len(hidden.points) * c.dim
        limit = state.config.max_feature_values
        if values > limit:
            raise ApiError(400, f"hidden_states: up to {values} numbers (tokens x layers x "
                           f"points x width); the server's limit is {limit} "
                           "(--max-feature-values)", param="hidden_states",
                           code="response_too_large")
        fields["hidden_blocks"] = tuple(blocks)
        fields["hidden_positions"] = hidden.positions
    names = [r.name for r in body.readouts]
    return fields, ReadingsSpec.of(names, hidden, steering)


async def prepare_readings(state: ServerState, body: Reading,
                           steering: tuple[SteeringTerm, ...], choices: list[Choice]
                           ) -> tuple[list[Choice], list[ChoiceReadings]]:
    """The choices, reading what the body asks for, and an accumulator for each."""
    longest = max(len(c.prompt) + c.spec[0].max_tokens for c in choices)
    fields, spec = await request_readings(state, body, steering, longest)
    if spec.active or body.readout_prompt:
        choices = [c._replace(spec=with_readings(c.spec, fields)) for c in choices]
    return choices, [ChoiceReadings(spec) for _ in choices]


def with_readings(spec: GenerationSpec, fields: dict[str, Any]) -> GenerationSpec:
    """A prepared choice that also reads what `fields` (GenerationRequest's) ask for."""
    gen, stop, at_start = spec
    return replace(gen, **fields), stop, at_start
