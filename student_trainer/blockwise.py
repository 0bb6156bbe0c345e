"""Blockwise parallel distillation: every student attention block imitates its teacher block on its own.

In a blockwise step the student's attention at layer j reads the teacher's
`attn_in[m(j)]` (m = `loss.layer_map`, identity by default) as its query and
key/value input instead of its own, and the optimised loss is the feature loss
between the student's `attn_out[j]` and the teacher's `attn_out[m(j)]` at the
mapped layers (`loss.feature_layers`, default all). Block j's output then
depends only on its own parameters and its injected input, so the blocks learn
independently, in parallel. Only attention parameters are on that path; every
other parameter (MLPs, norms, embeddings, head) is left exactly as it was by a
blockwise step (no weight decay either), so a later KD phase starts from them.

CE and KD are computed on the same (injected) forward and logged, never
optimised. Evaluation also runs the ordinary forward, so `eval/ce_loss`,
`eval/kd_loss` and `eval/chained_feature_loss` show whether the blocks work
when chained. See docs/blockwise.md.
"""

from __future__ import annotations

import jax
from flax import nnx

from distill_core.data import Batch
from distill_core.model.config import ModelConfig
from distill_core.targets import TeacherTargets
from student_trainer import losses

BLOCKWISE_STATES = ("attn_in", "attn_out")  # teacher states a blockwise step reads
FEATURE_STATES = ("attn_out",)  # teacher states the ordinary feature loss reads
# Parameters a blockwise step never changes: everything outside the attention blocks.
FROZEN_IN_BLOCKWISE = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("self_attn")))


def check_blockwise(loss_cfg: losses.LossConfig, *, student_layers: int, student_width: int,
                    teacher_layers: int, teacher_width: int, where: str) -> tuple[int, ...]:
  """The teacher layers a blockwise run reads; ValueError naming the fields and values otherwise.

  `where` names the teacher's fields in the message (e.g. "teacher.local.model").
  """
  if student_width != teacher_width:
    raise ValueError(f"loss.blockwise: needs equal embedding widths, but model.hidden_size is {student_width} "
                     f"and {where}.hidden_size is {teacher_width}")
  try:
    _, layers = loss_cfg.layer_pairs(student_layers, teacher_layers)
  except ValueError as e:
    raise ValueError(f"loss.blockwise: loss.layer_map {loss_cfg.layer_map} does not fit: {e} "
                     f"(model.num_hidden_layers {student_layers}, {where}.num_hidden_layers "
                     f"{teacher_layers})") from None
  return tuple(sorted(set(layers)))


def state_names_needed(loss_cfg: losses.LossConfig) -> tuple[str, ...]:
  """Teacher state names the run's steps read: both for blockwise, attn_out for a feature loss, else none."""
  if loss_cfg.ever_blockwise:
    return BLOCKWISE_STATES
  return FEATURE_STATES if loss_cfg.beta.bounds()[1] > 0 else ()


def state_names_at(loss_cfg: losses.LossConfig, step: int) -> tuple[str, ...]:
  """Teacher state names the objective of optimizer `step` reads."""
  if loss_cfg.phase_at(step) == "blockwise":
    return BLOCKWISE_STATES
  return FEATURE_STATES if loss_cfg.beta.bounds()[1] > 0 else ()


def phase_note(loss_cfg: losses.LossConfig, step: int, *, first: bool = False) -> str | None:
  """A line for the log when optimizer `step` starts another objective than step - 1, or is the `first`
  step this process trains in the blockwise phase: what the objective is from now on, and why
  train/total_loss changes scale."""
  phase = loss_cfg.phase_at(step)
  if not (first and phase == "blockwise") and (step == 0 or loss_cfg.phase_at(step - 1) == phase):
    return None
  if phase == "blockwise":
    until = "the whole run" if loss_cfg.blockwise_steps is None else f"steps {step + 1}-{loss_cfg.blockwise_steps}"
    return (f"step {step + 1}: blockwise phase for {until}: each attention block reads the teacher's attn_in and "
            "only the feature loss on attn_out is optimised (train/total_loss = that feature loss; CE and KD are "
            "logged, not optimised; only attention parameters change)")
  alpha, beta = float(loss_cfg.alpha.value(step)), float(loss_cfg.beta.value(step))
  return (f"step {step + 1}: blockwise phase over, ordinary KD from now on: the student's own forward, "
          f"train/total_loss = alpha * kd + (1 - alpha) * ce + beta * feature (alpha {alpha:g}, beta {beta:g}), "
          "every parameter trains; the total changes scale at this step")


def keep_states(targets: TeacherTargets | None, names: tuple[str, ...]) -> TeacherTargets | None:
  """`targets` with only the layer states `names` (a source may send more), so every step of one
  objective sees the same targets structure and its program is never compiled twice."""
  if targets is None or tuple(sorted(targets.layer_states)) == tuple(sorted(names)):
    return targets
  states = {name: value for name, value in targets.layer_states.items() if name in names}
  return targets.replace(layer_states=states, state_layers=targets.state_layers if states else ())


class BlockwiseLoss:
  """The blockwise objective for one (micro-)batch; returns (total, metric sums) like the KD objective."""

  frozen = FROZEN_IN_BLOCKWISE

  def __init__(self, loss_cfg: losses.LossConfig, model_cfg: ModelConfig):
    self.loss_cfg = loss_cfg
    self.true_vocab = model_cfg.real_vocab_size
    self.num_layers = model_cfg.num_hidden_layers

  def _pairs(self, targets: TeacherTargets) -> tuple[tuple[int, ...], tuple[int, ...]]:
    teacher_depth = max(targets.state_layers) + 1 if self.loss_cfg.layer_map is not None else self.num_layers
    return self.loss_cfg.layer_pairs(self.num_layers, teacher_depth)

  def _feature(self, model, batch: Batch, targets: TeacherTargets, *, inject: bool):
    """(model output, feature loss) of the injected (blockwise) or the ordinary forward."""
    student_layers, teacher_layers = self._pairs(targets)
    teacher_out = losses.select_teacher_states(targets, teacher_layers, "attn_out")  # (L, B, T, E)
    injected = None
    if inject:
      teacher_in = jax.lax.stop_gradient(losses.select_teacher_states(targets, teacher_layers, "attn_in"))
      injected = {j: teacher_in[i] for i, j in enumerate(student_layers)}
    out = model(batch.tokens, batch.positions, batch.segment_ids, state_layers=student_layers,
                state_names=("attn_out",), inject_attn_in=injected)
    feature, _ = losses.feature_loss(out.states["attn_out"], teacher_out, batch.loss_mask,
                                     kind=self.loss_cfg.feature_kind)
    return out, feature

  def _logged(self, logits, batch: Batch, targets: TeacherTargets, hyper) -> dict[str, losses.MaskedSum]:
    """CE and KD of `logits` (no gradient) and the KD metrics."""
    logits = jax.lax.stop_gradient(logits)
    ce, _ = losses.ce(logits, batch.targets, batch.loss_mask, true_vocab_size=self.true_vocab)
    kd, kd_metrics = losses.soft_loss(logits, targets, batch.loss_mask, self.loss_cfg,
                                      temperature=hyper["temperature"], true_vocab_size=self.true_vocab)
    return {"ce_loss": ce, "kd_loss": kd, **kd_metrics}

  def __call__(self, model, batch: Batch, targets: TeacherTargets, hyper, num_tokens):
    out, feature = self._feature(model, batch, targets, inject=True)
    total = feature.mean(num_tokens)
    parts = {"feature_loss": feature, **self._logged(out.logits, batch, targets, hyper)}
    sums = {f"{name}_sum": part.sum for name, part in parts.items()}
    sums["total_loss_sum"] = total * num_tokens
    sums["tokens"] = feature.count
    return total, sums

  def evaluate(self, model, batch: Batch, targets: TeacherTargets, hyper, num_tokens):
    """Metric sums: the blockwise feature loss, and CE, KD and feature loss of the ordinary forward."""
    _, sums = self(model, batch, targets, hyper, num_tokens)
    plain, chained = self._feature(model, batch, targets, inject=False)
    parts = {"chained_feature_loss": chained, **self._logged(plain.logits, batch, targets, hyper)}
    sums.update({f"{name}_sum": part.sum for name, part in parts.items()})
    return sums
