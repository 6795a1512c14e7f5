"""Evaluation metrics, each usable alone from Python and through `--mode=eval`.

- `fid`: Fréchet distance between feature statistics; statistics of features; `.npz` I/O.
- `inception`: the FID InceptionV3 (TTUR / pytorch-fid network) in Flax, Inception Score.
- `classifier`: small classifiers trained by the project, classifier-feature FID for small datasets.
- `likelihood`: importance-weighted log p(x) of a VAE, VAEBM's unnormalised log h(x) = log p(x) − E(x).
- `ood`: AUROC of any score.  `modes`: mode counting for stacked digits.

Modules are imported on their own (`from vaebm_jax.metrics import fid`); nothing heavy loads here.
"""
