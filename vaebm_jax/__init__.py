"""vaebm_jax: VAEBM (Xiao et al., ICLR 2021) in JAX/Flax.

Public API: `sample_fn` (pure ε-space Langevin sampler) and `load_vaebm` (restore a stage-2 workdir).
"""

from vaebm_jax.sampling import sample_fn
from vaebm_jax.workdir import load_vaebm

__all__ = ["load_vaebm", "sample_fn"]
