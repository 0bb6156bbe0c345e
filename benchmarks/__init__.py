"""Performance harnesses (run with `python -m benchmarks.<name>`)."""

from distill_core.logs import skip_absent_tpu

# Like the command lines (distill_core.logs.setup_logging), a benchmark leaves JAX's TPU backend out where no
# chip is attached: libtpu (installed for compiling ahead) would otherwise print a page of warnings in every
# benchmark process. Compiling for a topology (bench_scale) does not use that backend.
skip_absent_tpu()
