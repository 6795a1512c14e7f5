"""XLA:CPU temporaries of the input gradient through a stack of NVAE decoder cells, with and without
rematerialisation and with and without `parallel.compiler_options` (compile only, nothing is run).

  python experiments/remat_memory.py                  # 10 cells, batch 8, 16×16×256 (RESULTS.md, issue 10)

Prints MB of temporaries for: no remat; `nn.remat` cells compiled plainly; `nn.remat` cells compiled
with `parallel.compiler_options(remat=True)` (XLA's `cse_barrier_expander` pass off for the program).
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_integer("cells", 10, "decoder cells in the stack")
flags.DEFINE_integer("batch", 8, "images")
flags.DEFINE_integer("size", 16, "spatial size")
flags.DEFINE_integer("features", 256, "channels (the cells expand them 6×)")
FLAGS = flags.FLAGS


def main(_):
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from vaebm_jax import parallel
  from vaebm_jax.models.nvae import ARCH_CELLS, _cell_class

  arch = ARCH_CELLS["res_mbconv"]["normal_dec"]

  class Stack(nn.Module):
    remat: str

    @nn.compact
    def __call__(self, x):
      for i in range(FLAGS.cells):
        x = _cell_class(self.remat)(FLAGS.features, "normal_dec", arch, True, "auto", name=f"cell_{i}")(x, False)
      return jnp.sum(x ** 2)

  x = jax.ShapeDtypeStruct((FLAGS.batch, FLAGS.size, FLAGS.size, FLAGS.features), jnp.float32)
  variables = jax.eval_shape(lambda k: Stack("off").init(k, jnp.zeros(x.shape)), jax.random.key(0))
  for label, remat, options in (("no remat", "off", None), ("remat", "all", None),
                                ("remat + compiler_options", "all", parallel.compiler_options(True)),
                                ("keep_convs + compiler_options", "keep_convs", parallel.compiler_options(True))):
    model = Stack(remat)
    compiled = jax.jit(jax.grad(lambda x, v, m=model: m.apply(v, x)), compiler_options=options).lower(
        x, variables).compile()
    print(f"{label:26s} {compiled.memory_analysis().temp_size_in_bytes / 1e6:8.0f} MB", flush=True)


if __name__ == "__main__":
  app.run(main)
