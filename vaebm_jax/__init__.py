"""vaebm_jax: VAEBM (Xiao et al., ICLR 2021) in JAX/Flax.

Public API: `sample_fn` (pure ε-space Langevin sampler) and `load_vaebm` (restore a stage-2 workdir).
Both are imported on first use, so that `python -m vaebm_jax.main` answers a bad flag before JAX loads.
"""

_API = {"sample_fn": "vaebm_jax.sampling", "load_vaebm": "vaebm_jax.workdir"}

__all__ = ["load_vaebm", "sample_fn"]


def __getattr__(name):
  if name in _API:
    import importlib
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'vaebm_jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + __all__)
