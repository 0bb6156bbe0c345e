"""The layer-states part: the teacher's residual stream around attention at chosen layers, for the
feature and blockwise losses.

| field          | shape                | dtype     | meaning                                     |
|----------------|----------------------|-----------|---------------------------------------------|
| `layer_states` | name -> (L, B, T, E) | bf16 / f32| `attn_in` / `attn_out` of each chosen layer |
| `state_layers` | static tuple         |           | the teacher layer of each row L             |
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.struct
import jax
import numpy as np

from distill_core.bitpack import WireError
from distill_core.parts import base
from distill_core.parts.base import Array, Rows
from distill_core.tensor_codec import decode_tensor, encode_tensor

STATE_NAMES = ("attn_in", "attn_out")


@flax.struct.dataclass
class LayerStates:
  layer_states: dict[str, Array] = flax.struct.field(default_factory=dict)  # name -> (L, B, T, E)
  state_layers: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())

  def __post_init__(self):
    if not isinstance(self.state_layers, tuple):
      object.__setattr__(self, "state_layers", tuple(int(x) for x in self.state_layers))
    if self.layer_states is None:
      object.__setattr__(self, "layer_states", {})


def layer_states(states: Mapping[str, jax.Array] | None, state_layers: Sequence[int],
                 state_dtype: str | np.dtype | None) -> dict[str, jax.Array]:
  """The teacher's layer states by name, cast to `state_dtype` (unchanged when None)."""
  if not states:
    return {}
  if not state_layers:
    raise ValueError("state_layers: required when states are given")
  out = {}
  for name, value in states.items():
    if name not in STATE_NAMES:
      raise ValueError(f"states: unknown state {name!r} (known: {', '.join(STATE_NAMES)})")
    out[name] = value if state_dtype is None else value.astype(base.value_dtype_of(state_dtype))
  return out


class StatesPart(base.Part):
  name = "states"
  value_type = LayerStates
  row_axes = {"layer_states": 1}
  absent = {"layer_states": {}, "state_layers": ()}
  compute_args = ("states", "state_layers", "state_dtype")
  chunked = False  # taken from the model's layers, not from the logits

  def compute_whole(self, states=None, state_layers=(), state_dtype=None):
    picked = layer_states(states, state_layers, state_dtype)
    return LayerStates(picked, tuple(int(x) for x in state_layers)) if picked else None

  def validate(self, value: LayerStates, rows: Rows, expect) -> None:
    state_names, state_layers, hidden_size = (expect.get(key) for key in ("state_names", "state_layers",
                                                                          "hidden_size"))
    if state_names is not None and set(state_names) != set(value.layer_states):
      raise ValueError(f"layer_states: has {sorted(value.layer_states)}, expected {sorted(state_names)}")
    if state_layers is not None and tuple(state_layers) != value.state_layers:
      raise ValueError(f"state_layers: {value.state_layers} != expected {tuple(state_layers)}")
    if value.layer_states and not value.state_layers:
      raise ValueError("state_layers: empty although layer_states are present")
    if len(set(value.state_layers)) != len(value.state_layers):
      raise ValueError(f"state_layers: duplicate layers in {value.state_layers}")
    want = (len(value.state_layers), rows.batch_size, rows.seq_len)
    for name, x in value.layer_states.items():
      field = f"layer_states[{name}]"
      if name not in STATE_NAMES:
        raise ValueError(f"{field}: unknown state (known: {', '.join(STATE_NAMES)})")
      base.check_array(x, field, 4, base.FLOAT_DTYPES)
      if tuple(x.shape[:3]) != want:
        raise ValueError(f"{field}: shape {tuple(x.shape)} does not match [{want[0]} layers, B, T, E]")
      if hidden_size is not None and x.shape[3] != hidden_size:
        raise ValueError(f"{field}: width {x.shape[3]} != hidden_size {hidden_size}")

  def validate_absent(self, expect) -> None:
    """`TeacherTargets.validate` with state names expected of an answer without states."""
    if expect.get("state_names"):
      raise ValueError(f"layer_states: has [], expected {sorted(expect['state_names'])}")
    if expect.get("state_layers"):
      raise ValueError(f"state_layers: () != expected {tuple(expect['state_layers'])}")

  def concat_mismatch(self, first, other) -> str | None:
    a = first or LayerStates()
    b = other or LayerStates()
    if b.state_layers != a.state_layers or set(b.layer_states) != set(a.layer_states):
      return (f"has states {sorted(b.layer_states)} at layers {b.state_layers}, part 0 has "
              f"{sorted(a.layer_states)} at {a.state_layers}")
    return None

  # Host arrays: `layer_states.<name>` per state and `state_layers` as int32 (always present).
  _PREFIX = "layer_states."

  def to_numpy(self, value: LayerStates) -> dict[str, np.ndarray]:
    out = {"state_layers": np.asarray(value.state_layers, np.int32).reshape(-1)}
    out.update({self._PREFIX + name: np.asarray(x) for name, x in value.layer_states.items()})
    return out

  def owns_key(self, key: str) -> bool:
    return key == "state_layers" or key.startswith(self._PREFIX)

  def from_numpy(self, arrays) -> dict[str, Any]:
    states = {key[len(self._PREFIX):]: value for key, value in arrays.items() if key.startswith(self._PREFIX)}
    layers = tuple(int(x) for x in np.asarray(arrays.get("state_layers", ()), np.int64).reshape(-1))
    return {"layer_states": states, "state_layers": layers}

  def encode(self, value: LayerStates, resp, *, packed_id_bits, sorted_delta_values) -> None:
    resp.state_layers.extend(list(value.state_layers))
    for name, x in value.layer_states.items():
      resp.layer_states[name].CopyFrom(encode_tensor(x))

  def decode(self, resp, rows: Rows) -> dict[str, Any]:
    layers = tuple(int(layer) for layer in resp.state_layers)
    states = {}
    for name in sorted(resp.layer_states):
      value = decode_tensor(resp.layer_states[name], f"layer_states[{name}]", dtypes=base.WIRE_FLOATS, ndim=4)
      if value.shape[:3] != (len(layers), rows.batch_size, rows.seq_len):
        raise WireError(f"layer_states[{name}]", f"shape {list(value.shape)} does not match "
                                                 f"[{len(layers)} layers, B, T, E]")
      states[name] = value
    if layers and not states:
      raise WireError("layer_states", f"state_layers {list(layers)} given without any states")
    return {"layer_states": states, "state_layers": layers} if states else {}

  def select(self, value: LayerStates, need, where: str):
    if not need.layers:
      return None
    rows = []
    for layer in need.layers:
      if layer not in value.state_layers:
        raise ValueError(f"{where}: layers: teacher layer {layer} needed, stored layers {list(value.state_layers)}")
      rows.append(value.state_layers.index(layer))
    picked = {}
    for name in need.states:
      if name not in value.layer_states:
        raise ValueError(f"{where}: states: {name!r} needed, stored {sorted(value.layer_states)}")
      picked[name] = value.layer_states[name][rows]
    return LayerStates(picked, tuple(need.layers)) if picked else None

  def from_engine(self, out, rows, length, req) -> dict[str, Any]:
    if not req.layers:
      return {}
    states = {name: np.stack([out.states[name][layer][rows, :length] for layer in req.layers]).astype(
        req.state_dtype, copy=False) for name in req.states}
    return {"layer_states": states, "state_layers": req.layers if states else ()}

  def check(self, needs, offer) -> list[str]:
    try:
      layers = needs.layers(offer.num_layers)
    except ValueError as e:
      return [f"layers: {e} (the teacher has {offer.num_layers} layers)"]
    if not layers:
      return []
    problems = []
    missing = [layer for layer in layers if layer not in offer.layers]
    absent = [name for name in needs.state_names if name not in offer.states]
    if offer.stored:
      if missing:
        problems.append(f"spec.layers: stored {list(offer.layers)}, the losses need teacher layers {list(layers)}")
      if absent:
        problems.append(f"spec.states: stored {list(offer.states)}, the losses need {list(needs.state_names)} "
                        "(blockwise reads attn_in and attn_out)")
      if needs.hidden_size is not None and offer.hidden_size != needs.hidden_size:
        problems.append(f"teacher.hidden_size: stored {offer.hidden_size!r}, the student's {needs.hidden_size!r}")
      return problems
    if missing:
      problems.append(f"layers: the losses need teacher layers {missing}, not selectable "
                      f"(selectable: {list(offer.layers)})")
    if absent:
      problems.append(f"layers: the teacher does not offer {', '.join(absent)} states (offered: "
                      f"{list(offer.states)})")
    if needs.hidden_size is not None and offer.hidden_size != needs.hidden_size:
      problems.append(f"layers: teacher width {offer.hidden_size} != student width {needs.hidden_size} "
                      f"(the losses compare {' and '.join(needs.state_names)} states; model.hidden_size "
                      "must equal the teacher's)")
    if needs.state_dtype is not None and offer.state_dtypes is not None and \
        needs.state_dtype not in offer.state_dtypes:
      problems.append(f"state_dtype: {needs.state_dtype} not offered (offered: {list(offer.state_dtypes)})")
    return problems

PART = StatesPart()
