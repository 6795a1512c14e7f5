"""Input pipelines: tfds.data_source + grain for the paper's datasets, local sources for offline use.

Every dataset becomes a `grain.MapDataset` of per-process batches of float32 NHWC images in [0, 1],
indexable by step so that a resumed run reads exactly the batches an uninterrupted run would.
"""

from vaebm_jax.data.pipeline import DatasetUnavailableError, ImageDataset, create_dataset, example_shape

__all__ = ["DatasetUnavailableError", "ImageDataset", "create_dataset", "example_shape"]
