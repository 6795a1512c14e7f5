"""experiments/colab_tpu.ipynb runs top to bottom on CPU (smoke configs, 4 simulated devices)."""

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "experiments")
NOTEBOOK = os.path.join(EXPERIMENTS, "colab_tpu.ipynb")


def test_committed_notebook_is_the_generated_one_without_outputs():
  from experiments import make_colab_notebook
  nb = nbformat.read(NOTEBOOK, as_version=4)
  assert all(not cell.get("outputs") and cell.get("execution_count") is None
             for cell in nb.cells if cell.cell_type == "code")
  expected = make_colab_notebook.build()
  cells = lambda notebook: [(c.cell_type, c.source, c.metadata) for c in notebook.cells]
  assert nb.metadata == expected.metadata and cells(nb) == cells(expected), \
      "experiments/colab_tpu.ipynb differs from its generator: python experiments/make_colab_notebook.py"


@pytest.mark.slow
def test_notebook_runs_and_shows_samples(tmp_path, monkeypatch):
  # The kernel inherits this environment: CPU like the rest of the suite, smoke size, a temporary workdir.
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("VAEBM_NOTEBOOK_SIZE", "smoke")
  monkeypatch.setenv("VAEBM_NOTEBOOK_WORKDIR", str(tmp_path))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=900,
                                   resources={"metadata": {"path": EXPERIMENTS}})
  client.execute()   # raises CellExecutionError, with the cell's traceback, if any cell fails

  by_tag = {tag: cell for cell in nb.cells for tag in cell.metadata.get("tags", [])}
  devices = "".join(o.get("text", "") for o in by_tag["devices"].outputs)
  assert "device count: 4" in devices
  sample = by_tag["sample"]
  text = "".join(o.get("text", "") for o in sample.outputs if o.output_type == "stream")
  assert "sharding:" in text and text.count(": samples ") == 4, text   # 32 samples, 8 on each of 4 devices
  assert any("image/png" in o.get("data", {}) for o in sample.outputs if o.output_type == "display_data")
  assert os.path.isdir(tmp_path / "digits_smoke" / "ebm" / "checkpoints")
