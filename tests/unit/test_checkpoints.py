"""Whole-model checkpoints: Orbax model directories round-trip, in either layer layout."""

import numpy as np
import pytest

from distill_core.checkpoints import load_model, save_model_orbax
from distill_core.config import build, resolve_preset
from distill_core.model.config import ModelConfig
from distill_core.model.transformer import create_model


def test_orbax_model_round_trip_and_layout_override(tmp_path):
  cfg = build(ModelConfig, resolve_preset("tiny"))
  model = create_model(cfg, seed=1)
  save_model_orbax(model, tmp_path / "m")
  tokens = np.arange(24, dtype=np.int32).reshape(2, 12) % cfg.vocab_size
  want = np.asarray(model(tokens).logits)
  same = load_model(orbax_checkpoint=str(tmp_path / "m"))
  np.testing.assert_array_equal(np.asarray(same(tokens).logits), want)
  scanned = load_model(orbax_checkpoint=str(tmp_path / "m"), scan_layers=True)
  assert scanned.cfg.scan_layers
  np.testing.assert_allclose(np.asarray(scanned(tokens).logits), want, rtol=1e-6, atol=1e-6)


def test_load_model_rejects_ambiguous_or_missing_sources(tmp_path):
  with pytest.raises(ValueError, match="at most one"):
    load_model(hf_checkpoint="a", orbax_checkpoint="b")
  with pytest.raises(ValueError, match="no model source"):
    load_model()
  with pytest.raises(FileNotFoundError, match="not an Orbax model directory"):
    load_model(orbax_checkpoint=str(tmp_path))
