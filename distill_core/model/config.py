"""Model configuration: a Llama-family decoder, field names as in Hugging Face `config.json`."""

from __future__ import annotations

from typing import Literal

import pydantic
from pydantic import Field

from distill_core.config import ConfigBase, resolve_preset


AttentionImpl = Literal["auto", "xla", "chunked", "splash", "cudnn"]
RematPolicy = Literal["none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "save_attn_out",
                      "save_qkv_attn_out"]


RUNTIME_FIELDS = ("scan_layers", "dtype", "param_dtype", "remat", "attention", "attention_chunk")


class RopeScaling(ConfigBase):
  """Llama-3 style rope frequency scaling (Hugging Face `rope_scaling` with rope_type llama3)."""

  rope_type: Literal["llama3", "default"] = Field("llama3", description="Scaling rule; 'default' disables scaling.")
  factor: float = Field(8.0, gt=0, description="Wavelength scale factor for low frequencies.")
  low_freq_factor: float = Field(1.0, gt=0, description="Low-frequency boundary factor.")
  high_freq_factor: float = Field(4.0, gt=0, description="High-frequency boundary factor.")
  original_max_position_embeddings: int = Field(8192, gt=0, description="Context length the rope was trained for.")


class ModelConfig(ConfigBase):
  """A Llama/Qwen2-family decoder-only transformer."""

  model_type: Literal["llama", "qwen2"] = Field("llama", description="Architecture family (Hugging Face model_type).")
  vocab_size: int = Field(..., gt=0, description="Rows of the embedding table (may be padded above the tokenizer's size).")
  true_vocab_size: int | None = Field(
      None, gt=0, description="Real vocabulary size; logits of ids >= this are masked. None = vocab_size.")
  hidden_size: int = Field(..., gt=0, description="Embedding width E.")
  intermediate_size: int = Field(..., gt=0, description="SwiGLU MLP hidden width.")
  num_hidden_layers: int = Field(..., gt=0, description="Number of decoder layers L.")
  num_attention_heads: int = Field(..., gt=0, description="Query heads H.")
  num_key_value_heads: int = Field(..., gt=0, description="Key/value heads (grouped-query attention).")
  head_dim: int | None = Field(None, gt=0, description="Per-head width D; None = hidden_size // num_attention_heads.")
  rms_norm_eps: float = Field(1e-5, gt=0, description="RMSNorm epsilon.")
  rope_theta: float = Field(10000.0, gt=0, description="Rotary base frequency.")
  rope_scaling: RopeScaling | None = Field(None, description="Optional Llama-3 rope scaling.")
  max_position_embeddings: int = Field(2048, gt=0, description="Longest supported sequence.")
  attention_bias: bool = Field(False, description="Bias on q/k/v projections (true for Qwen2).")
  tie_word_embeddings: bool = Field(False, description="Share the input embedding with the output head.")
  dtype: Literal["float32", "bfloat16"] = Field("float32", description="Compute dtype of activations.")
  param_dtype: Literal["float32", "bfloat16"] = Field("float32", description="Storage dtype of parameters.")
  scan_layers: bool = Field(False, description="Stack layer parameters and run them with nnx.scan (else unrolled).")
  attention: AttentionImpl = Field(
      "auto", description="Attention kernel: 'xla' (dense reference; float32 scores for every head, O(T^2) "
      "memory), 'chunked' (pure-XLA online softmax over query/key blocks, O(T) memory), 'splash' (TPU Pallas "
      "kernel), 'cudnn' (GPU cuDNN fused attention on rows holding one sequence, else chunked), 'auto' (by "
      "platform: tpu -> splash, gpu -> cudnn, else xla up to attention.DENSE_MAX_LEN tokens, chunked above).")
  attention_chunk: int = Field(
      512, gt=0, description="Query and key block length of the chunked and splash kernels; their temporaries "
      "are O(B * H * chunk^2) instead of O(B * H * T^2).")
  remat: RematPolicy = Field(
      "none", description="Rematerialisation policy of each layer's backward pass: 'none' saves every "
      "activation; 'full' saves only the layer input and recomputes the layer; 'dots_saveable' / "
      "'dots_with_no_batch_dims_saveable' keep matmul outputs (all / weight matmuls only, so no attention "
      "scores); 'save_attn_out' keeps only the attention block's output; 'save_qkv_attn_out' also keeps the "
      "rotated q, k, v. Booleans are accepted: true = 'full', false = 'none'.")

  @pydantic.field_validator("remat", mode="before")
  @classmethod
  def _remat_bool(cls, value):
    if isinstance(value, bool):  # the former `remat: true/false`
      return "full" if value else "none"
    return value

  @pydantic.model_validator(mode="after")
  def _check(self) -> "ModelConfig":
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
          f"num_key_value_heads ({self.num_key_value_heads})")
    if self.head_dim is None and self.hidden_size % self.num_attention_heads:
      raise ValueError("hidden_size must be divisible by num_attention_heads when head_dim is unset")
    if self.true_vocab_size is not None and self.true_vocab_size > self.vocab_size:
      raise ValueError(f"true_vocab_size ({self.true_vocab_size}) exceeds vocab_size ({self.vocab_size})")
    return self

  def __hash__(self) -> int:
    # Models keep their config as a static attribute, so graph definitions that
    # hold it must be hashable (e.g. `jax.jit(..., static_argnums=...)`).
    return hash(self.model_dump_json())

  def runtime_fields(self) -> dict:
    """The fields that are not checkpoint properties (layout, dtypes, remat, attention kernel): pass them
    on when loading weights, e.g. `load_model(hf_checkpoint=..., **cfg.runtime_fields())`."""
    return {name: getattr(self, name) for name in RUNTIME_FIELDS}

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  @property
  def real_vocab_size(self) -> int:
    return self.true_vocab_size or self.vocab_size


# Use as `Annotated[ModelConfig, ModelConfigOrPreset]` so a field also accepts a preset name
# (`tiny`) or `{preset: tiny, <overrides>}`.
ModelConfigOrPreset = pydantic.BeforeValidator(resolve_preset)
