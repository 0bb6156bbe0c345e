"""The optimizer: AdamW, linear warmup then cosine decay, global-norm clipping."""

from __future__ import annotations

import optax

from student_trainer.config import OptimConfig


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  decay_steps = cfg.decay_steps or total_steps
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
      decay_steps=max(decay_steps, cfg.warmup_steps + 1), end_value=cfg.learning_rate * cfg.end_lr_fraction)


def build_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
  """One optimizer update per optimizer step (gradient accumulation happens in the step)."""
  parts = []
  if cfg.clip_norm is not None:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay))
  return optax.chain(*parts)
