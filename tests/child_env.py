"""XLA settings of the test processes and of the CLIs they start as child processes.

Tests run tiny models for a few steps, so XLA compilation, not execution, is most of their time. LLVM at
optimisation level 0 compiles about twice as fast on a 2-core CPU (the DualU-Net training fixture of
tests/test_train.py: 46.7 s -> 19.3 s of backend compilation, 72 s -> 45 s in all): the same programs, less
optimised by LLVM. Production code paths are untouched (the flag is set for the tests only).
"""

import os
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
FAST_COMPILE_FLAGS = '--xla_backend_optimization_level=0'
# The test processes themselves see 4 CPU devices, so the sharded code paths run on a CPU-only machine.
TEST_XLA_FLAGS = f'--xla_force_host_platform_device_count=4 {FAST_COMPILE_FLAGS}'


# Grouped convolutions through XLA's grouped kernels: the CPU path of models/grouped_conv.py splits them into many
# small convolutions, which take longer to compile than tiny test models take to run. tests/test_grouped_conv.py
# checks that path (outputs and gradients against lax, whole models) with explicit `implementation(...)` blocks.
GROUPED_CONV = {'DUALUNET_GROUPED_CONV': 'xla'}

# A persistent XLA cache the CLI children share across test runs (`.data/`, git-ignored): a child's cold start is
# mostly compiling the eager init ops of its model.
SHARED_CACHE = {'JAX_COMPILATION_CACHE_DIR': str(REPO / '.data' / 'jax_cache_tests'),
                'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0', 'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '-1'}


def child_env(**extra: str) -> dict[str, str]:
  """os.environ for a CLI child process: the checkout importable, one CPU device (as on a user's laptop), the
  tests' fast compilation, plus `extra`."""
  return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get('PYTHONPATH', ''),
              JAX_PLATFORMS='cpu', XLA_FLAGS=FAST_COMPILE_FLAGS, **{**GROUPED_CONV, **extra})
