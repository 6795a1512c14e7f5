"""The errors a run reports to the user as one line (`main.run`), in a module that imports nothing, so
that the command line can name them before JAX, TensorFlow or orbax load."""


class DatasetUnavailableError(RuntimeError):
  """A dataset is missing; the message names it, where we looked and what to do."""


class WorkdirError(RuntimeError):
  """A stage-1 or stage-2 workdir is missing, unfinished or does not fit; the message says what to do."""


class CheckpointMismatchError(RuntimeError):
  """A readable checkpoint whose arrays do not fit the state of this run."""


class DivergenceError(RuntimeError):
  """Training diverged more often than `guard.max_rollbacks` allows (or before any good checkpoint)."""


class Preempted(Exception):
  """SIGTERM / SIGINT (or a multi-host preemption notice) arrived; a checkpoint of `step` was written."""

  def __init__(self, signal_name: str, step: int, directory: str):
    super().__init__(f"{signal_name} at step {step}: checkpoint written to {directory}; rerun the same command "
                     f"to continue")
    self.signal_name, self.step = signal_name, step


class ConfigValueError(ValueError):
  """A config field holds a value outside its choices; the message names the field and the choices."""


ONE_LINE_ERRORS = (DatasetUnavailableError, WorkdirError, CheckpointMismatchError, DivergenceError, ConfigValueError)
