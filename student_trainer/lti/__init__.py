"""Learn-to-init (LTI): student attention projections computed from frozen teacher kernels.

`kernels` (the contractions and initial maps), `modules` (the LTI projection and
the frozen TeacherKernel variable), `config` (the `lti:` section), `teacher`
(teacher kernels from HF, Orbax or the teacher server), `surgery` (regex plan
and apply), `build` (the trainer's hooks). See docs/lti.md.
"""
