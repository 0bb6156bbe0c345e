"""Learn-to-init kernels: the effective student kernel from a frozen teacher kernel C.

Shapes (DESIGN section 6; E equal for teacher and student, Ht/Hs heads, Dt/Ds head dims):

    query/key/value  C (E, Ht, Dt)   factorised A (Ht, Hs), B (Dt, Ds)   K[e,u,v] = C[e,x,y] A[x,u] B[y,v]
                                     general    W (Ht, Dt, Hs, Ds)       K[e,u,v] = C[e,x,y] W[x,y,u,v]
    output           C (Ht, Dt, E)   factorised A (Ht, Hs), B (Ds, Dt)   K[u,v,e] = C[x,y,e] A[x,u] B[v,y]
                                     general    W (Ht, Dt, Hs, Ds)       K[u,v,e] = C[x,y,e] W[x,y,u,v]

With scanned layers every tensor has a leading layer axis (L, ...), contracted
layer by layer. Ht is the query-head count for query and output, the kv-head
count for key and value.

Initial maps (so the student starts as a slice of the teacher, not as noise):

- A, ``select``: student head u is one teacher head. Heads are chosen with the
  grouped-query structure intact: student kv head j is teacher kv head
  ``sel(j)`` (evenly spaced), and student query head g of group j is query head
  ``sel_g(g)`` of the chosen teacher group, so every student query head still
  reads the key/value head its teacher head read.
- A, ``average``: student kv head j averages a contiguous bucket of teacher kv
  heads, student query head (j, g) averages the matching query heads; for the
  output projection the bucket is summed (its heads' contributions add up in
  the teacher).
- B, ``identity``: a truncated identity that keeps rotary pairs: the first
  Ds/2 dims of each rotary half (dims y and y + Dt/2 rotate together).
- B, ``svd``: value/output get the top-Ds right singular directions of the
  teacher's value kernel (as (E*Ht, Dt)); the output uses the transpose, so
  value-then-output is the teacher's pathway projected on those directions.
  Query/key keep the rotary-pair identity (a mixing B would not commute with
  the rotation).
- W (general map) starts as the outer product of the same A and B.
"""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp
import numpy as np

Kind = Literal["q", "k", "v", "o"]
AInit = Literal["select", "average"]
BInit = Literal["identity", "svd"]
PROJ_KINDS: tuple[Kind, ...] = ("q", "k", "v", "o")


def _prefix(layered: bool) -> str:
  return "l" if layered else ""


def effective_kernel(kind: Kind, c, a=None, b=None, w=None, *, layered: bool = False):
  """The student kernel of a q/k/v ((E, Hs, Ds)) or output ((Hs, Ds, E)) projection.

  Give (a, b) for the factorised map or w for the general one; `layered`: every
  tensor has a leading layer axis. Computed in float32.
  """
  if (w is None) == (a is None or b is None):
    raise ValueError("give either a and b (factorised) or w (general map)")
  l = _prefix(layered)
  c = jnp.asarray(c, jnp.float32)
  if w is not None:
    w = jnp.asarray(w, jnp.float32)
    if kind == "o":
      return jnp.einsum(f"{l}xye,{l}xyuv->{l}uve", c, w)
    return jnp.einsum(f"{l}exy,{l}xyuv->{l}euv", c, w)
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  if kind == "o":
    return jnp.einsum(f"{l}xye,{l}xu,{l}vy->{l}uve", c, a, b)
  return jnp.einsum(f"{l}exy,{l}xu,{l}yv->{l}euv", c, a, b)


def effective_bias(kind: Kind, c_bias, a=None, b=None, w=None, *, layered: bool = False):
  """A teacher bias mapped like its kernel: q/k/v (Ht, Dt) -> (Hs, Ds); output (E,) unchanged."""
  if kind == "o":
    return jnp.asarray(c_bias, jnp.float32)
  l = _prefix(layered)
  c_bias = jnp.asarray(c_bias, jnp.float32)
  if w is not None:
    return jnp.einsum(f"{l}xy,{l}xyuv->{l}uv", c_bias, jnp.asarray(w, jnp.float32))
  return jnp.einsum(f"{l}xy,{l}xu,{l}yv->{l}uv", c_bias, jnp.asarray(a, jnp.float32),
                    jnp.asarray(b, jnp.float32))


# ----------------------------------------------------------------------------- initial maps


def _even(n_from: int, n_to: int) -> np.ndarray:
  """n_to indices spread evenly over range(n_from) (repeats when n_to > n_from)."""
  return (np.arange(n_to) * n_from) // n_to


def _buckets(n_from: int, n_to: int) -> np.ndarray:
  """(n_from, n_to) 0/1 matrix: contiguous buckets of source heads per target head."""
  if n_to > n_from:  # more target heads than source heads: each source head feeds several targets
    m = np.zeros((n_from, n_to), np.float32)
    m[_even(n_from, n_to), np.arange(n_to)] = 1.0
    return m
  edges = (np.arange(n_to + 1) * n_from) // n_to
  m = np.zeros((n_from, n_to), np.float32)
  for u in range(n_to):
    m[edges[u]:edges[u + 1], u] = 1.0
  return m


def _select(n_from: int, n_to: int) -> np.ndarray:
  m = np.zeros((n_from, n_to), np.float32)
  m[_even(n_from, n_to), np.arange(n_to)] = 1.0
  return m


def head_map(kind: Kind, how: AInit, *, teacher_heads: int, teacher_kv_heads: int, student_heads: int,
             student_kv_heads: int) -> np.ndarray:
  """A (Ht, Hs) for projection `kind` (query heads for q/o, kv heads for k/v)."""
  pick = _select if how == "select" else _buckets
  kv = pick(teacher_kv_heads, student_kv_heads)
  if how == "average":
    kv = kv / kv.sum(axis=0, keepdims=True)
  if kind in ("k", "v"):
    return kv
  # Query heads are laid out kv-major: head = kv * G + g (Hugging Face repeat_kv).
  group = pick(teacher_heads // teacher_kv_heads, student_heads // student_kv_heads)
  if how == "average":
    group = group / group.sum(axis=0, keepdims=True)
  a = np.kron(kv, group).astype(np.float32)  # (Ht, Hs)
  if kind == "o" and how == "average":
    a = (a > 0).astype(np.float32)  # the output sums the heads a student head stands for
  return a


def rotary_identity(teacher_dim: int, student_dim: int) -> np.ndarray:
  """B (Dt, Ds): the first Ds/2 dims of each rotary half (y and y + Dt/2 rotate together)."""
  if student_dim > teacher_dim or student_dim % 2 or teacher_dim % 2:
    raise ValueError(f"head dims must be even with student <= teacher, got Dt={teacher_dim}, Ds={student_dim}")
  half_t, half_s = teacher_dim // 2, student_dim // 2
  b = np.zeros((teacher_dim, student_dim), np.float32)
  idx = np.arange(half_s)
  b[idx, idx] = 1.0
  b[half_t + idx, half_s + idx] = 1.0
  return b


def top_singular_directions(value_kernel: np.ndarray, student_dim: int) -> np.ndarray:
  """B (Dt, Ds): top right singular vectors of a value kernel (E, Ht, Dt) (or (L, E, Ht, Dt) -> (L, Dt, Ds))."""
  c = np.asarray(value_kernel, np.float64)
  if c.ndim == 4:
    return np.stack([top_singular_directions(layer, student_dim) for layer in c])
  flat = c.reshape(-1, c.shape[-1])  # (E*Ht, Dt)
  _, _, vt = np.linalg.svd(flat, full_matrices=False)
  b = vt[:student_dim].T  # (Dt, Ds), orthonormal columns
  # Fix each direction's sign (largest component positive) so the choice is deterministic.
  signs = np.sign(b[np.abs(b).argmax(axis=0), np.arange(b.shape[1])])
  return (b * np.where(signs == 0, 1.0, signs)).astype(np.float32)


def dim_map(kind: Kind, how: BInit, *, teacher_dim: int, student_dim: int,
            value_kernel: np.ndarray | None = None) -> np.ndarray:
  """B for projection `kind`: (Dt, Ds) for q/k/v, (Ds, Dt) for the output."""
  if how == "svd" and kind in ("v", "o"):
    if value_kernel is None:
      raise ValueError("b_init=svd needs the teacher's value kernel")
    b = top_singular_directions(value_kernel, student_dim)
  else:
    b = rotary_identity(teacher_dim, student_dim)
  return np.swapaxes(b, -1, -2) if kind == "o" else b


def general_map(a: np.ndarray, b: np.ndarray, kind: Kind) -> np.ndarray:
  """W (Ht, Dt, Hs, Ds) equal to the factorised (A, B) map."""
  if kind == "o":
    b = np.swapaxes(b, -1, -2)  # (Dt, Ds)
  return np.einsum("...xu,...yv->...xyuv", a, b).astype(np.float32)
