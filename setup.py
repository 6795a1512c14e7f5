"""vaebm_jax: VAEBM (Xiao et al., ICLR 2021) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="vaebm_jax",
    version="0.1.0",
    description="VAEBM: a VAE (NVAE) refined by an energy-based model, with Langevin dynamics in the "
                "VAE's noise space, in JAX/Flax",
    packages=find_packages(include=["vaebm_jax", "vaebm_jax.*", "configs"]),
    package_data={"vaebm_jax.metrics": ["weights/*.npz"],    # the small-dataset classifiers (metrics.classifier)
                  "vaebm_jax": ["pretrained/**/*"],          # shipped models (workdir.pretrained)
                  "vaebm_jax.models": ["csrc/*.cc"]},        # the native CPU kernel, built on first use
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.8",
        "jaxlib>=0.8",
        "flax>=0.10",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "tensorflow-datasets>=4.9.8",
        "importlib_resources",          # tfds 4.9.x imports it without declaring it
        "ml-collections>=1.0",
        "clu>=0.0.12",
        "tensorflow-cpu>=2.16",         # clu's metric writers and tfds Image features
        "tensorboard",                  # clu's writers import it; TF >= 2.21 no longer brings it
        "grain>=0.2.10",                # tfds.data_source + grain pipelines
        "array-record>=0.7",
        "scikit-learn",                 # bundled 8×8 digits for the offline quickstart
        "scipy",                        # FID's matrix square root
        "matplotlib",                   # the experiments' figures
        "pillow",
        "numpy",
        "absl-py",
    ],
    extras_require={"test": ["pytest", "pytest-xdist", "ruff", "nbclient", "nbformat", "ipykernel"]},
)
