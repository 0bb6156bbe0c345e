"""The pure train and eval steps, jitted once with the state donated.

Each optimizer step has an objective (`LossConfig.phase_at`): `kd` (the ordinary
CE + KD + feature mix, `_LossFn`) or `blockwise` (`blockwise.BlockwiseLoss`).
One jitted program exists per objective, built by `make_train_step(..., phase)`,
so a run that switches objectives compiles exactly one new program. An
objective may name parameters it never changes (`frozen`); they are restored
after the optimizer update, so weight decay does not move them either.

Gradient accumulation splits the global batch into `grad_accum` micro-batches
and scans over them. Every micro-batch loss is divided by the token count of
the WHOLE batch, so the summed losses and gradients equal the full-batch
token-weighted mean exactly (not a mean of micro-batch means). Schedules
(alpha, beta, temperature) come in as traced scalars and advance once per
optimizer step.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from distill_core.data import Batch
from distill_core.model.config import ModelConfig
from distill_core.sharding import traced_on
from distill_core.targets import TeacherTargets
from student_trainer import losses, losses_on_policy
from student_trainer.blockwise import BlockwiseLoss
from student_trainer.config import TrainConfig

Metrics = dict[str, jax.Array]


def hyperparameters(cfg: TrainConfig, step: int) -> dict[str, np.ndarray]:
  """Schedule values at optimizer `step`, as f32 arrays (traced by the step: no recompiles)."""
  return {name: np.float32(getattr(cfg.loss, name).value(step)) for name in ("alpha", "beta", "temperature")}


class _LossFn:
  """Student forward + every loss term for one (micro-)batch; returns (total, metric sums)."""

  frozen = None  # every parameter trains

  def __init__(self, loss_cfg: losses.LossConfig, model_cfg: ModelConfig):
    self.loss_cfg = loss_cfg
    self.true_vocab = model_cfg.real_vocab_size
    self.num_layers = model_cfg.num_hidden_layers

  def feature_layers(self, targets: TeacherTargets | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(student layers, teacher layers) of the feature loss; empty when there are no teacher states."""
    if targets is None or "attn_out" not in targets.layer_states:
      return (), ()
    teacher_depth = max(targets.state_layers) + 1
    if self.loss_cfg.layer_map is None:
      teacher_depth = self.num_layers
    return self.loss_cfg.layer_pairs(self.num_layers, teacher_depth)

  def __call__(self, model, batch: Batch, targets: TeacherTargets | None, hyper, num_tokens):
    student_layers, teacher_layers = self.feature_layers(targets)
    out = model.hidden_states(batch.tokens, batch.positions, batch.segment_ids, state_layers=student_layers,
                              state_names=("attn_out",))
    mask = batch.loss_mask
    alpha = hyper["alpha"]
    # The lm_head runs inside the loss, per chunk of positions: no whole (B, T, V) logits.
    if self.on_policy(targets):
      # The student's own samples: the on-policy KD term alone (weight 1, no CE; docs/on_policy.md).
      kd, kd_metrics = losses_on_policy.fused_run_loss(
          out.hidden, model.logits_from_hidden, targets, mask, self.loss_cfg, temperature=hyper["temperature"],
          sampler_logprobs=batch.sampler_logprobs, true_vocab_size=self.true_vocab)
      ce, alpha = None, jnp.float32(1.0)
    else:
      ce, kd, kd_metrics = losses.fused_logit_losses(
          out.hidden, model.logits_from_hidden, batch.targets, targets, mask, self.loss_cfg,
          temperature=hyper["temperature"], true_vocab_size=self.true_vocab)
    feature = None
    sums = {f"{name}_sum": m.sum for name, m in kd_metrics.items()}
    if targets is not None:
      if student_layers:
        teacher_states = losses.select_teacher_states(targets, teacher_layers)
        feature, _ = losses.feature_loss(out.states["attn_out"], teacher_states, mask,
                                         kind=self.loss_cfg.feature_kind)
    total, _ = losses.combine(kd=kd, ce=ce, feature=feature, alpha=alpha, beta=hyper["beta"],
                              num_tokens=num_tokens)
    for name, part in (("ce_loss", ce), ("kd_loss", kd), ("feature_loss", feature)):
      if part is not None:
        sums[f"{name}_sum"] = part.sum
    sums["total_loss_sum"] = total * num_tokens
    sums["tokens"] = (ce if ce is not None else kd).count
    return total, sums

  def on_policy(self, targets: TeacherTargets | None) -> bool:
    """Whether a batch trains with the on-policy loss: the run's kd_mode is one and the answer scores given ids
    (static: the targets' structure)."""
    return targets is not None and self.loss_cfg.scores_given_ids and targets.has_scored

  def evaluate(self, model, batch: Batch, targets: TeacherTargets | None, hyper, num_tokens):
    return self(model, batch, targets, hyper, num_tokens)[1]


OBJECTIVES = {"kd": _LossFn, "blockwise": BlockwiseLoss}


def objective(cfg: TrainConfig, phase: losses.Phase):
  """The loss object of `phase` (`kd` or `blockwise`)."""
  if phase not in OBJECTIVES:
    raise ValueError(f"phase: {phase!r} not in {', '.join(OBJECTIVES)}")
  return OBJECTIVES[phase](cfg.loss, cfg.model)


def _micro(batch: Batch, targets: TeacherTargets | None, index, size: int):
  """Rows [index*size, (index+1)*size) of the batch and its targets (states are (L, B, T, E))."""

  def rows(x, axis=0):
    return jax.lax.dynamic_slice_in_dim(x, index * size, size, axis=axis)

  micro_batch = jax.tree.map(rows, batch)
  if targets is None:
    return micro_batch, None
  return micro_batch, targets.map_rows(rows)


def make_train_step(graphdef: nnx.GraphDef, cfg: TrainConfig, phase: losses.Phase = "kd", shardings=None,
                    mesh: Mesh | None = None):
  """Returns `step(params, batch, targets, hyper) -> (params, metrics)`, jitted, params donated.

  `shardings` (of params) pins the returned params to the same layout as the given ones, so the
  first step's inputs and every later step's match and the program is not compiled twice.
  `mesh`: traced with it as the abstract mesh (`distill_core.sharding.traced_on`), so the
  attention kernel is the one for the mesh's platform and runs sharded over it.

  A `blockwise` step needs targets with `attn_in` and `attn_out` states (use the `kd` step
  for a batch without an answer).

  `metrics["finite"]` is False when the loss or the gradient norm is not finite; the returned
  params are then the input params, unchanged (the step is skipped on the device).
  """
  loss_fn = objective(cfg, phase)
  accum = cfg.optim.grad_accum

  def train_step(params, batch: Batch, targets: TeacherTargets | None, hyper):
    before = jax.tree.map(lambda x: x, params)  # the values, apart from the Variables merge shares
    model, optimizer = nnx.merge(graphdef, params)
    # The optimizer's `wrt` (nnx.Param, or the parameters learn-to-init trains): the rest gets no gradient.
    model_def, trainable, rest = nnx.split(model, optimizer.wrt, ...)
    num_tokens = jnp.sum(batch.loss_mask.astype(jnp.float32))

    def micro_loss(trainable, micro_batch, micro_targets):
      return loss_fn(nnx.merge(model_def, trainable, rest), micro_batch, micro_targets, hyper, num_tokens)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    if accum == 1:
      (_, sums), grads = grad_fn(trainable, batch, targets)
    else:
      size = batch.tokens.shape[0] // accum

      def body(acc, index):
        (_, sums), grads = grad_fn(trainable, *_micro(batch, targets, index, size))
        return jax.tree.map(jnp.add, acc, (grads, sums)), None

      shapes = jax.eval_shape(lambda: grad_fn(trainable, *_micro(batch, targets, 0, size)))
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[1], shapes[0][1]))
      (grads, sums), _ = jax.lax.scan(body, zeros, jnp.arange(accum))
    kept = None if loss_fn.frozen is None else jax.tree.map(lambda x: x, nnx.state(model, loss_fn.frozen))
    grad_norm = optax.global_norm(grads)
    optimizer.update(model, grads)
    if kept is not None:
      nnx.update(model, kept)
    # A non-finite loss or gradient (a bad teacher answer, a diverging student) must never reach
    # the parameters: the step keeps the old model and optimizer state (moments, step counter).
    finite = jnp.isfinite(sums["total_loss_sum"]) & jnp.isfinite(grad_norm)
    new_params = jax.tree.map(lambda new, old: jnp.where(finite, new, old), nnx.state((model, optimizer)), before)
    metrics = dict(sums, grad_norm=grad_norm, finite=finite)
    if targets is not None:  # the schedules only matter when there is a teacher
      metrics.update({name: jnp.asarray(value) for name, value in hyper.items()})
    return new_params, metrics

  out = None if shardings is None else (shardings, None)  # None: metrics placed as XLA likes
  return jax.jit(traced_on(mesh, train_step), donate_argnums=0, out_shardings=out)


def make_eval_step(graphdef: nnx.GraphDef, cfg: TrainConfig, phase: losses.Phase = "kd", mesh: Mesh | None = None):
  """Returns `eval_step(params, batch, targets, hyper) -> metric sums` (ce, kd, tokens...)."""
  loss_fn = objective(cfg, phase)

  def eval_step(params, batch: Batch, targets: TeacherTargets | None, hyper) -> Metrics:
    model, _ = nnx.merge(graphdef, params)
    num_tokens = jnp.sum(batch.loss_mask.astype(jnp.float32))
    return loss_fn.evaluate(model, batch, targets, hyper, num_tokens)

  return jax.jit(traced_on(mesh, eval_step))


class Programs:
  """The jitted train and eval step of each objective, built on first use (each compiles once)."""

  def __init__(self, graphdef: nnx.GraphDef, cfg: TrainConfig, shardings=None, mesh: Mesh | None = None):
    self._graphdef, self._cfg, self._shardings, self._mesh = graphdef, cfg, shardings, mesh
    self._train: dict[str, object] = {}
    self._eval: dict[str, object] = {}

  def phase(self, step: int, targets: TeacherTargets | None) -> losses.Phase:
    """The objective of `step`; a batch without teacher targets always trains on CE (the kd program)."""
    return self._cfg.loss.phase_at(step) if targets is not None else "kd"

  def train(self, phase: losses.Phase):
    if phase not in self._train:
      self._train[phase] = make_train_step(self._graphdef, self._cfg, phase, self._shardings, self._mesh)
    return self._train[phase]

  def eval(self, phase: losses.Phase):
    if phase not in self._eval:
      self._eval[phase] = make_eval_step(self._graphdef, self._cfg, phase, self._mesh)
    return self._eval[phase]

  def compilations(self) -> dict[str, int]:
    """Compiled train-step programs so far, per objective (one per targets structure)."""
    return {phase: fn._cache_size() for phase, fn in self._train.items()}  # noqa: SLF001 - jit cache size
