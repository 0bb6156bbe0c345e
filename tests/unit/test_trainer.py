"""The local teacher source without the training loop: an evaluation between submit and next leaves the
stream's answer alone (runs of the trainer are in tests/integration/test_trainer.py)."""

from __future__ import annotations

import numpy as np


def test_local_source_evaluation_does_not_disturb_the_stream(tiny_dataset):
  from distill_core.checkpoints import load_model
  from distill_core.config import build, resolve_preset
  from distill_core.data import DataConfig, make_eval_iterator
  from distill_core.model.config import ModelConfig
  from distill_core.sharding import MeshConfig, make_mesh, rules_table
  from student_trainer.sources.local import LocalTeacher
  mesh_cfg = MeshConfig(data=1)
  model = load_model(build(ModelConfig, resolve_preset("tiny")), seed=2)
  source = LocalTeacher(model, k=8, value_dtype="float32", mesh=make_mesh(mesh_cfg), rules=rules_table(mesh_cfg))
  it = make_eval_iterator(DataConfig(path=str(tiny_dataset), batch_size=4))
  train_batch, eval_batch = next(it), next(it)
  it.close()
  source.submit(train_batch, 1.0)
  evaluated = source.compute(eval_batch, 2.0)
  streamed = source.next()
  ref = model(eval_batch.tokens, eval_batch.positions, eval_batch.segment_ids).logits
  np.testing.assert_array_equal(np.asarray(evaluated.topk_ids[..., 0]), np.argmax(np.asarray(ref), axis=-1))
  np.testing.assert_array_equal(np.asarray(evaluated.temperatures), [2.0])
  np.testing.assert_array_equal(np.asarray(streamed.temperatures), [1.0])
  ref_train = model(train_batch.tokens, train_batch.positions, train_batch.segment_ids).logits
  np.testing.assert_array_equal(np.asarray(streamed.topk_ids[..., 0]), np.argmax(np.asarray(ref_train), axis=-1))
