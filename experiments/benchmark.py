"""Speed and memory of vaebm_jax beside the official PyTorch code, measured in one run on this host.

  python experiments/benchmark.py                          # every row; the reference's too if present
  python experiments/benchmark.py --rows=lg_c10_b4,ebm_cel_b4 --out=/tmp/b.json
  python experiments/benchmark.py --noreference             # ours only
  python experiments/benchmark.py --table=experiments/results/benchmark.json   # print the markdown table

Each row times the same work on both sides, the reference's and ours alternately, one process per
measurement so that peak RSS is that measurement's own:
- `lg_*`: one ε-space Langevin step of the test-time sampler (decode T(ε) through the NVAE decoder,
  energy, 'code' potential, its ε-gradient, update); ours inside the jitted `lax.scan` chain.
  `lg_chq_b1` (CelebA-HQ 256, batch 1) is ours only: the reference driver has no such config.
- `ebm_*`: one EBM training iteration (K Langevin steps from fresh noise, E⁺/E⁻, spectral
  regulariser, backward, IGEBM clip, Adam); no replay buffer, as the reference driver runs it.
- `nvae_*`: one NVAE training step (forward, recon + balanced KL, spectral and BN regularisers,
  backward, Adamax).
- `small_*`: the small configs' training steps at their own batch sizes (ours only: the reference
  has no such configs).

The reference runs through `../shared/refbench/refbench.py` (unmodified NVlabs/VAEBM on CPU; its
README says how to set it up in `$REFBENCH`, default `<tmp>/refbench`); batch >= 16 runs it with
jemalloc without decay, as that README prescribes. Every measurement reports the seconds per step
(median of the timed steps; ours times whole chains of `steps` steps), the first step or compile time,
the process's peak RSS, the CPU time other processes used meanwhile (`foreign_cpu_frac`: rerun when it is
above a few percent) and, for ours, XLA's FLOP count of the program (lowered with every loop unrolled,
since XLA counts a loop body once) and the GFLOP/s achieved against the host's measured fp32 matmul peak.
Writes `--out` (default experiments/results/benchmark.json) and prints one markdown table.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments import common  # noqa: E402
from vaebm_jax import hostenv  # noqa: E402


def _ref(cfg, task, warmup, repeats):
  return ["--cfg", cfg, "--task", task, "--warmup", str(warmup), "--repeats", str(repeats)]


# name: (kind, dataset/config, batch (0: the config's), our CPU devices (0: one per core, -1: the config's),
#        refbench.py arguments or None)
ROWS = {
    "lg_c10_b1": ("langevin", "cifar10", 1, 1, _ref("cifar10", "langevin", 2, 7)),
    "lg_c10_b4": ("langevin", "cifar10", 4, 0, _ref("cifar10", "langevin", 1, 5)),
    "lg_c10_b16": ("langevin", "cifar10", 16, 0, _ref("cifar10", "langevin", 1, 3)),
    "lg_cel_b4": ("langevin", "celeba64", 4, 0, _ref("celeba64", "langevin", 1, 5)),
    "ebm_c10_b4": ("ebm", "cifar10", 4, 0, _ref("cifar10", "ebmtrain", 1, 3)),
    "ebm_cel_b4": ("ebm", "celeba64", 4, 0, _ref("celeba64", "ebmtrain", 1, 3)),
    "nvae_c10_b4": ("nvae", "cifar10", 4, 1, _ref("cifar10", "nvaetrain", 1, 3)),
    "lg_chq_b1": ("langevin", "celebahq256", 1, 1, None),   # ours only: refbench.py has no CelebA-HQ config
    "small_fmnist_vae": ("nvae", "fashion_mnist", 0, -1, None),
    "small_fmnist_ebm": ("ebm", "fashion_mnist", 0, -1, None),
    "small_digits_vae": ("nvae", "digits", 0, -1, None),
    "small_digits_ebm": ("ebm", "digits", 0, -1, None),
}
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"

flags.DEFINE_list("rows", list(ROWS), "rows to run")
flags.DEFINE_bool("reference", True, "also time the reference when $REFBENCH holds it")
flags.DEFINE_string("out", os.path.join(common.RESULTS, "benchmark.json"), "JSON written at the end")
flags.DEFINE_integer("repeats", 3, "our timed chains / steps after the compiling one")
flags.DEFINE_integer("chain_steps", 2, "Langevin steps per timed chain of ours")
flags.DEFINE_integer("batch", 0, "override every chosen row's batch size (both sides; 0: the row's)")
flags.DEFINE_integer("devices", -2, "override our CPU device count (0: one per core; -2: the row's)")
flags.DEFINE_string("table", None, "print the markdown table of this benchmark.json and exit")
flags.DEFINE_string("worker", None, "internal: run our side of this row in this process and print JSON")
flags.DEFINE_bool("count_flops", False, "internal: with --worker, only count the row's FLOPs (own process, so that "
                  "tracing the unrolled program does not count in the timed process's peak RSS)")
flags.DEFINE_bool("remat", None, "ours: rematerialise the NVAE's cells in backward passes (default: the config's "
                  "model.remat_cells for nvae rows, vae_remat_cells for the others)")
flags.DEFINE_bool("scan_groups", True, "ours, nvae rows: one nn.scan per scale over the latent groups "
                  "(model.scan_groups)")
flags.DEFINE_string("compare_options", None, "with --worker: also compile the row's program with these XLA options "
                    "added (a JSON object, e.g. '{\"xla_cpu_prefer_vector_width\": 512}') and time the two "
                    "alternately, step by step, in this process; the JSON gets a 'compare' entry (its 'ratio': "
                    "the second program's median over the first's, < 1 where the options help). Separate "
                    "runs drift by ±10 % on a shared host, which hides a few-percent change")
flags.DEFINE_string("profile", None, "with --worker: write a jax.profiler trace of the timed steps here")
flags.DEFINE_string("conv_impl", "auto", "ours: auto | xla | fast_cpu")
flags.DEFINE_enum("conv_dtype", "float32", ["float32", "bfloat16"], "ours: operand dtype of both networks' "
                  "convolutions (model.conv_dtype, vae_conv_dtype, ebm.conv_dtype; bfloat16 is for accelerators)")
flags.DEFINE_enum("reference_device", "cpu", ["cpu", "cuda"], "where the reference runs: cpu (refbench.py as it "
                  "is) or cuda (through experiments/refbench_gpu.py, on a GPU beside ours)")
flags.DEFINE_string("reference_python", None, "python with torch for the reference (default $REFBENCH/venv/bin/python)")
flags.DEFINE_string("refbench", None, "path of refbench.py (default ../shared/refbench/refbench.py)")
flags.DEFINE_bool("flops", True, "also count our rows' FLOPs with XLA (one more process per row)")
flags.DEFINE_bool("huge_pages", True, "ours: glibc's malloc on transparent huge pages, as `python -m vaebm_jax.main` "
                  "runs (vaebm_jax/hostenv.py)")
flags.DEFINE_bool("reference_huge_pages", False, "give the reference the same GLIBC_TUNABLES (its own runs have it "
                  "not; batch >= 16 runs it with jemalloc anyway)")
FLAGS = flags.FLAGS


# ---------------------------------------------------------------------------------------------- ours


def _random_variables(init_fn, key):
  """Variables of `init_fn`'s shapes filled with small random weights (BN variances 1) without compiling
  `init` (minutes for the 130.7 M-parameter NVAE on XLA:CPU); speed does not depend on the values."""
  import jax
  import numpy as np
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(init_fn, key)
  fill = lambda path, s: (np.ones(s.shape, np.float32) if "var" in jax.tree_util.keystr(path) else
                          np.zeros(s.shape, np.float32) if "batch_stats" in jax.tree_util.keystr(path) else
                          (0.02 * rng.standard_normal(s.shape)).astype(np.float32))
  return jax.tree_util.tree_map_with_path(fill, shapes)


def _flops(fn, *args):
  """XLA's operation count of `fn` lowered (not compiled), in FLOP."""
  import jax
  cost = jax.jit(fn).lower(*args).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan")))


def _temp_gb(compiled):
  """XLA's temporary buffers of the compiled program (activations kept for the backward pass and the
  like), GB per device."""
  try:
    return compiled.memory_analysis().temp_size_in_bytes / 1e9
  except Exception:                        # not every backend reports it
    return float("nan")


def _profiled():
  """`jax.profiler.trace` into `--profile` (a Perfetto trace too), or nothing."""
  import jax
  return jax.profiler.trace(FLAGS.profile, create_perfetto_trace=True) if FLAGS.profile else contextlib.nullcontext()


# Minor page faults of the process over the last timed calls: XLA allocates each call's temporaries afresh,
# so without huge pages (vaebm_jax/hostenv.py) every 4 KB of them faults on every call.
_FAULTS = {}
_COMPARE = {}      # --compare_options: the second program's timings


def _minor_faults():
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _time(compiled, args, repeats):
  import jax
  times, faults = [], _minor_faults()
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  _FAULTS["per_call"] = (_minor_faults() - faults) / repeats
  return times


def _compile(make_jit, base_options, *args):
  """(compiled program, compile seconds, the program with --compare_options added or None): `make_jit(options)`
  is the row's `jax.jit` with those compiler options, lowered with `args`."""
  t0 = time.perf_counter()
  compiled = make_jit(base_options).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  if not FLAGS.compare_options:
    return compiled, compile_s, None
  extra = _compare_options()
  _COMPARE["options"] = extra
  return compiled, compile_s, make_jit(dict(base_options or {}, **extra)).lower(*args).compile()


def _compare_options() -> dict:
  """--compare_options as a dict; a UsageError (before anything compiles) where it cannot be used."""
  if FLAGS.profile:
    raise app.UsageError("--compare_options and --profile: profile one program at a time")
  try:
    extra = json.loads(FLAGS.compare_options)
  except json.JSONDecodeError:
    extra = None
  if not isinstance(extra, dict):
    raise app.UsageError(f"--compare_options must be a JSON object, got {FLAGS.compare_options!r}")
  return extra


def _alternate(run, other, repeats, scale=1.0):
  """Times `run()` and `other()` in turn (which goes first alternates), each time divided by `scale`; fills
  `_COMPARE`, returns run's times."""
  times, other_times = [], []
  for r in range(repeats):
    for which in ((run, times), (other, other_times))[:: 1 if r % 2 == 0 else -1]:
      t0 = time.perf_counter()
      which[0]()
      which[1].append((time.perf_counter() - t0) / scale)
  _COMPARE.update(s_per_step=statistics.median(other_times), s_per_step_min=min(other_times), times=other_times,
                  base_times=times, faster_pairs=sum(b < a for a, b in zip(times, other_times, strict=True)),
                  ratio=statistics.median(other_times) / statistics.median(times))
  _FAULTS["per_call"] = float("nan")      # two programs' faults together: not one's
  return times


def _time_compared(compiled, other, args, repeats, scale=1.0):
  """`_time`, or with --compare_options both programs alternately (times divided by `scale`)."""
  import jax
  if other is None:
    return [t / scale for t in _time(compiled, args, repeats)]
  jax.block_until_ready(other(*args))
  return _alternate(lambda: jax.block_until_ready(compiled(*args)), lambda: jax.block_until_ready(other(*args)),
                    repeats, scale)


def _time_steps(compiled, state, *args, other=None):
  """One warm-up step, then `--repeats` timed steps of `compiled(state, *args, key)`, the last one profiled
  with `--profile`. Returns (times, last metrics, final state). With `other` (--compare_options), it steps
  a copy of the state in turn with the main program."""
  import jax
  if other is not None:
    import jax.numpy as jnp
    states, out, calls = {"main": state, "other": jax.tree.map(jnp.copy, state)}, {}, {"main": 0, "other": 0}

    def stepper(name, program):     # the keys of the path below: 1 for the warm-up, then 2, 3, …
      def step():
        calls[name] += 1
        states[name], out[name] = program(states[name], *args, jax.random.key(calls[name]))
        jax.block_until_ready(out[name])
      return step
    main, second = stepper("main", compiled), stepper("other", other)
    main()
    second()
    return _alternate(main, second, FLAGS.repeats), out["main"], states["main"]
  state, metrics = compiled(state, *args, jax.random.key(1))
  jax.block_until_ready(metrics)
  times, faults = [], _minor_faults()
  for r in range(FLAGS.repeats):
    t0 = time.perf_counter()
    with _profiled() if r == FLAGS.repeats - 1 else contextlib.nullcontext():
      state, metrics = compiled(state, *args, jax.random.key(2 + r))
      jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  _FAULTS["per_call"] = (_minor_faults() - faults) / FLAGS.repeats
  return times, metrics, state


def _stage2_models(dataset):
  import jax
  import jax.numpy as jnp

  from vaebm_jax import train_vae
  from vaebm_jax.workdir import create_ebm, stage2_vae
  vae_cfg, ebm_cfg = common.stage_configs(dataset)
  if FLAGS.remat is not None:
    ebm_cfg.vae_remat_cells = FLAGS.remat
  vae_cfg.model.conv_impl = ebm_cfg.ebm.conv_impl = FLAGS.conv_impl
  vae_cfg.model.conv_dtype = ebm_cfg.vae_conv_dtype = ebm_cfg.ebm.conv_dtype = FLAGS.conv_dtype
  vae = stage2_vae(train_vae.create_model(vae_cfg).clone(scan_groups=bool(ebm_cfg.get("vae_scan_groups", False))),
                   ebm_cfg)
  x = jnp.zeros((1,) + tuple(vae.image_shape))
  # What stage 2 restores (`workdir.load_vae`): not init's sown `normalized_weights`, a second copy of
  # the weights (0.52 GB for CIFAR-10) that no sampler or EBM step of ours holds.
  # Of those, stage 2 holds only what the decoder reads (`interface.decoder_variables`, as `train_ebm` and
  # `evaluate.draw_samples` do): the encoder tower is another 0.29 GB.
  init = lambda k: vae.decoder_variables({c: v for c, v in vae.init({"params": k, "sample": k}, x, False).items()
                                          if c in ("params", "batch_stats")})
  vae_variables = _random_variables(init, jax.random.key(0))
  return vae_cfg, ebm_cfg, vae, vae_variables, create_ebm(ebm_cfg, data_init=False)


def ours_langevin(dataset, batch):
  import jax

  from vaebm_jax import parallel, sampling
  _, ebm_cfg, vae, vae_variables, ebm = _stage2_models(dataset)
  x = jax.numpy.zeros((1,) + tuple(vae.image_shape))
  params = {"vae": vae_variables, "ebm": _random_variables(lambda k: ebm.init(k, x), jax.random.key(1))}
  mesh = parallel.create_mesh()
  params = jax.device_put(params, parallel.replicated(mesh))
  del vae_variables               # the host copy: a sampler loaded by `load_vaebm` holds only the device ones
  steps = FLAGS.chain_steps

  def chain(key, params, num_steps=steps, unroll=1):
    eps = sampling.initial_noise(key, vae, batch, mesh)
    potential = lambda e: sampling.potential_fn(e[0], e[1], params, vae=vae, ebm=ebm, potential="code")
    final, energies, _ = sampling.langevin_chain(eps, key, potential, num_steps=num_steps,
                                                 step_size=ebm_cfg.langevin.step_size, unroll=unroll)
    return final, energies          # the final ε too: with one step only the energy would be DCE-able

  if FLAGS.count_flops:
    return dict(flops_per_step=_flops(lambda k, p: chain(k, p, 2, 2), jax.random.key(2), params)
                - _flops(lambda k, p: chain(k, p, 1, 1), jax.random.key(2), params))
  compiled, compile_s, other = _compile(lambda opts: jax.jit(chain, compiler_options=opts),
                                       parallel.compiler_options_for(vae), jax.random.key(2), params)
  temp_gb = _temp_gb(compiled)
  jax.block_until_ready(compiled(jax.random.key(3), params))
  with _profiled():
    times = _time_compared(compiled, other, (jax.random.key(4), params), FLAGS.repeats, scale=steps)
  return dict(devices=mesh.size, s_per_step=statistics.median(times), s_per_step_min=min(times), compile_s=compile_s,
              xla_temp_gb=temp_gb, steps_timed=FLAGS.repeats * steps,
              minor_faults_per_step=_FAULTS["per_call"] / steps)


def ours_ebm(dataset, batch):
  import dataclasses

  import jax
  import numpy as np

  from vaebm_jax import parallel, train_ebm
  from vaebm_jax.workdir import create_ebm
  _, ebm_cfg, vae, vae_variables, _ = _stage2_models(dataset)
  batch = batch or ebm_cfg.train.batch_size
  ebm_cfg.buffer.use = False                 # as the reference driver (use_buffer=False)
  ebm = create_ebm(ebm_cfg)
  mesh = parallel.create_mesh()
  repl, sharded = parallel.replicated(mesh), parallel.data_sharded(mesh)
  parallel.check_batch_size(batch, mesh)
  images = np.random.default_rng(0).uniform(size=(batch,) + tuple(vae.image_shape)).astype(np.float32)
  tx = train_ebm.create_optimizer(ebm_cfg)
  init = lambda k, x: train_ebm.create_train_state(ebm, vae, tx, k, x)
  args = (jax.random.key(0), parallel.shard_batch(images, mesh))
  state = jax.eval_shape(init, *args) if FLAGS.count_flops else jax.jit(init, out_shardings=repl)(*args)
  vae_variables = jax.device_put(vae_variables, repl)
  settings = train_ebm.StepSettings.of(ebm_cfg)

  def step(state, batch, vv, key, settings=settings):
    return train_ebm.train_step(state, batch, key, vae=vae, vae_variables=vv, ebm=ebm, tx=tx, settings=settings,
                                mesh=mesh)

  x = args[1]
  if FLAGS.count_flops:
    unrolled = dataclasses.replace(settings, chain=dataclasses.replace(settings.chain, unroll=settings.chain.num_steps))
    return dict(flops_per_step=_flops(lambda s, b, v, k: step(s, b, v, k, unrolled), state, x, vae_variables,
                                      jax.random.key(1)))
  compiled, compile_s, other = _compile(
      lambda opts: jax.jit(step, in_shardings=(repl, sharded, repl, repl), out_shardings=(repl, repl),
                           donate_argnums=0, compiler_options=opts),
      parallel.compiler_options_for(vae), state, x, vae_variables, jax.random.key(1))
  temp_gb = _temp_gb(compiled)
  times, metrics, _ = _time_steps(compiled, state, x, vae_variables, other=other)
  return dict(devices=mesh.size, batch=batch, langevin_steps=settings.chain.num_steps,
              s_per_step=statistics.median(times), s_per_step_min=min(times), compile_s=compile_s,
              xla_temp_gb=temp_gb, steps_timed=len(times), loss_finite=bool(np.isfinite(float(metrics["loss"]))))


def ours_nvae(dataset, batch):
  import functools

  import jax
  import numpy as np

  from vaebm_jax import objectives, parallel, train_vae
  config, _ = common.stage_configs(dataset)
  config.model.update(conv_impl=FLAGS.conv_impl, conv_dtype=FLAGS.conv_dtype)
  if FLAGS.remat is not None:
    config.model.remat_cells = FLAGS.remat
  batch = batch or config.train.batch_size
  mesh = parallel.create_mesh()
  parallel.check_batch_size(batch, mesh)
  model = train_vae.create_model(config).clone(scan_groups=FLAGS.scan_groups)
  tx, schedule = train_vae.create_optimizer(config, steps_per_epoch=195, epochs=max(config.train.epochs, 1))
  repl, sharded = parallel.replicated(mesh), parallel.data_sharded(mesh)
  if FLAGS.count_flops:          # XLA counts a loop body once: count the NVAE with its groups unscanned
    model = model.clone(scan_groups=False)
  init = functools.partial(train_vae.create_train_state, model, tx, image_shape=tuple(model.image_shape))
  state = jax.eval_shape(init, jax.random.key(0)) if FLAGS.count_flops else jax.jit(init, out_shardings=repl)(
      jax.random.key(0))

  def step(state, batch, key):
    return train_vae.train_step(state, batch, key, model=model, tx=tx, schedule=schedule,
                                settings=train_vae.StepSettings.of(config), total_steps=100_000,
                                alpha=objectives.kl_balancer_coefficients(model.groups))

  x = parallel.shard_batch(np.random.default_rng(0).uniform(size=(batch,) + tuple(model.image_shape))
                           .astype(np.float32), mesh)
  if FLAGS.count_flops:
    return dict(flops_per_step=_flops(step, state, x, jax.random.key(1)))
  compiled, compile_s, other = _compile(
      lambda opts: jax.jit(step, in_shardings=(repl, sharded, repl), out_shardings=(repl, repl), donate_argnums=0,
                           compiler_options=opts),
      parallel.compiler_options_for(model), state, x, jax.random.key(1))
  temp_gb = _temp_gb(compiled)
  times, metrics, state = _time_steps(compiled, state, x, other=other)
  return dict(devices=mesh.size, batch=batch, s_per_step=statistics.median(times), s_per_step_min=min(times),
              compile_s=compile_s, xla_temp_gb=temp_gb, steps_timed=len(times),
              loss_finite=bool(np.isfinite(float(metrics["loss"]))),
              params=int(sum(np.prod(p.shape) for p in jax.tree.leaves(state.params))))


def matmul_peak():
  """The host's fp32 matmul throughput in XLA (4096², one device using every core), GFLOP/s."""
  import jax
  n = 4096
  a = jax.random.normal(jax.random.key(0), (n, n))
  f = jax.jit(lambda a: a @ a)
  jax.block_until_ready(f(a))
  times = _time(f, (a,), 5)
  return 2.0 * n ** 3 / min(times) / 1e9


def worker(row):
  kind, dataset, batch, devices, _ = ROWS[row] if row in ROWS else ("matmul", None, 0, 1, None)
  if FLAGS.compare_options:
    _compare_options()
  batch, devices = FLAGS.batch or batch, devices if FLAGS.devices == -2 else FLAGS.devices
  import jax
  if devices < 0:                          # the config's own CPU device count, as training uses it
    vae_cfg, ebm_cfg = common.stage_configs(dataset)
    devices = (vae_cfg if kind == "nvae" else ebm_cfg).get("cpu_devices", 0)
  jax.config.update("jax_num_cpu_devices", devices or os.cpu_count())
  if kind == "matmul":
    result = {"matmul_gflops": matmul_peak()}
  else:
    result = {"langevin": ours_langevin, "ebm": ours_ebm, "nvae": ours_nvae}[kind](dataset, batch)
    if not FLAGS.count_flops:
      result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
      if kind != "langevin":                 # one step per timed call
        result["minor_faults_per_step"] = _FAULTS["per_call"]
  device = jax.devices()[0]
  result["device"] = device.device_kind if device.platform != "cpu" else "cpu"
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and "peak_bytes_in_use" in stats:
    result["peak_device_gb"] = stats["peak_bytes_in_use"] / 1e9
  if _COMPARE:
    result["compare"] = _COMPARE
  print(json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------- driver


def _busy_cpu_s():
  with open("/proc/stat") as f:
    v = [float(x) for x in f.readline().split()[1:]]
  return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


def _last_json(text):
  """The JSON object that ends `text`: ours prints one line, refbench an indented block."""
  lines = text.rstrip().splitlines()
  for i in range(len(lines) - 1, -1, -1):
    if lines[i].startswith("{"):
      return json.loads("\n".join(lines[i:]))
  raise ValueError("no JSON in the output")


def _measure(cmd, env=None):
  """Runs `cmd`, returns (its JSON, peak RSS GB, wall s, other processes' share of the machine's CPUs)."""
  with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
    busy0, t0 = _busy_cpu_s(), time.time()
    p = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, env=env, text=True)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall, busy = time.time() - t0, _busy_cpu_s() - busy0
    out.seek(0)
    err.seek(0)
    text, errors = out.read(), err.read()
  # /proc/stat counts in clock ticks: a run of a few ticks can exceed 1 by rounding
  foreign = min(1.0, max(0.0, busy - usage.ru_utime - usage.ru_stime) / (wall * os.cpu_count()))
  if p.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {errors[-1500:]}")
  return _last_json(text), usage.ru_maxrss / 1e6, wall, foreign


def reference_python(python=None, script=None):
  """(python, refbench.py, $REFBENCH) when the reference is set up, else None."""
  base = os.environ.get("REFBENCH", os.path.join(tempfile.gettempdir(), "refbench"))
  py = python or os.path.join(base, "venv", "bin", "python")
  script = script or os.path.join(ROOT, "..", "shared", "refbench", "refbench.py")
  py = shutil.which(py) or py
  ok = all(os.path.exists(p) for p in (py, script, os.path.join(base, "VAEBM"), os.path.join(base, "NVAE")))
  return (py, os.path.abspath(script), base) if ok else None


def run_reference(ref, row, batch, args, device="cpu", huge_pages=False):
  py, script, base = ref
  env = dict(os.environ, REFBENCH=base)
  if device == "cuda":
    script = [os.path.join(ROOT, "experiments", "refbench_gpu.py"), script]
  else:
    script = [script]
    if batch >= 16 and os.path.exists(JEMALLOC):
      env.update(LD_PRELOAD=JEMALLOC, MALLOC_CONF="dirty_decay_ms:-1,muzzy_decay_ms:-1")
    elif huge_pages:
      env = hostenv.with_huge_pages(env) or env
  out, rss, wall, foreign = _measure([py, "-W", "ignore", *script, *args, "--batch", str(batch)], env)
  s = out.get("sec_per_step") or out.get("sec_per_iter") or out.get("total_step_s")
  return dict(s_per_step=s["median"], s_per_step_min=s["min"], first_step_s=out.get("first_step_s",
              out.get("first_iter_s")), peak_rss_gb=rss, wall_s=wall, foreign_cpu_frac=foreign,
              jemalloc="LD_PRELOAD" in env, glibc_tunables=env.get("GLIBC_TUNABLES", ""), torch=out.get("torch"),
              threads=out.get("threads"),
              device=out.get("gpu", "cpu"), peak_gpu_gb=out.get("peak_gpu_gb"))


def run_ours(row):
  cmd = [sys.executable, os.path.abspath(__file__), f"--worker={row}", f"--repeats={FLAGS.repeats}",
         f"--chain_steps={FLAGS.chain_steps}", f"--conv_impl={FLAGS.conv_impl}", f"--conv_dtype={FLAGS.conv_dtype}",
         f"--batch={FLAGS.batch}", f"--scan_groups={FLAGS.scan_groups}",
         f"--devices={FLAGS.devices}"] + ([] if FLAGS.remat is None else [f"--remat={FLAGS.remat}"])
  # Ours runs as `python -m vaebm_jax.main` runs it: with glibc's malloc on huge pages (vaebm_jax/hostenv.py).
  env = hostenv.with_huge_pages(os.environ) if FLAGS.huge_pages else None
  out, rss, wall, foreign = _measure(cmd, env=env)
  result = dict(out, peak_rss_gb=rss, wall_s=wall, foreign_cpu_frac=foreign, conv_dtype=FLAGS.conv_dtype,
                glibc_tunables=(env or os.environ).get("GLIBC_TUNABLES", ""))
  if row in ROWS and FLAGS.flops:
    result.update(_measure(cmd + ["--count_flops"])[0])
  return result


def table(result) -> str:
  rows = result["rows"].values()
  accel = next((r["ours"]["device"] for r in rows if r.get("ours", {}).get("device", "cpu") != "cpu"), None)
  where = (f"Accelerator: {accel} (ours); reference on {result.get('reference_device', 'cpu')}. Host: "
           if accel else "Host: ")
  memory = "peak GPU memory ref / ours GB" if accel else "peak RSS ref / ours GB"
  lines = [f"{where}{result['host']['cpu']} ({result['host']['isa']}, {result['host']['cores']} cores), "
           f"XLA {'default-precision' if accel else 'fp32'} matmul peak {result['matmul_gflops']:.0f} GFLOP/s; "
           f"{result['date']}.", "",
           f"| row | batch | ref s/step | ours s/step | ours vs ref (speed) | ours compile s | {memory} "
           "| ours GFLOP/s (% of matmul peak) | foreign CPU ref / ours |",
           "|---|---|---|---|---|---|---|---|---|"]
  gb = lambda side, key: f"{side[key]:.1f}" if side and side.get(key) is not None else "–"
  for name, r in result["rows"].items():
    o, ref = r.get("ours", {}), r.get("reference")
    if "error" in o:
      lines.append(f"| {name} | | | failed: {o['error'][:80]} |||||")
      continue
    ref_s = f"{ref['s_per_step']:.3f}" if ref else ("failed" if "reference_error" in r else "–")
    ratio = f"**{r['speedup']:.2f}×**" if r.get("speedup") else "–"
    mem = (f"{gb(ref, 'peak_gpu_gb')} / {gb(o, 'peak_device_gb')}" if accel else
           f"{gb(ref, 'peak_rss_gb')} / {gb(o, 'peak_rss_gb')}")
    if "flops_per_step" in o:
      gf = o["flops_per_step"] / o["s_per_step"] / 1e9
      flops = f"{gf:.0f} ({gf / result['matmul_gflops']:.0%})"
    else:
      flops = "–"
    foreign = (f"{ref['foreign_cpu_frac']:.0%} / " if ref else "– / ") + f"{o['foreign_cpu_frac']:.0%}"
    label = name + (" (bf16 convs)" if o.get("conv_dtype", "float32") != "float32" else "")
    lines.append(f"| {label} | {o.get('batch', r['batch'])} | {ref_s} | {o['s_per_step']:.3f} | {ratio} | "
                 f"{o['compile_s']:.1f} | {mem} | {flops} | {foreign} |")
  return "\n".join(lines)


def main(_):
  if FLAGS.worker:
    worker(FLAGS.worker)
    return
  if FLAGS.table:
    with open(FLAGS.table) as f:
      print(table(json.load(f)))
    return
  unknown = sorted(set(FLAGS.rows) - set(ROWS))
  if unknown:
    sys.exit(f"error: unknown rows {unknown}; choose from {', '.join(ROWS)}")
  ref = reference_python(FLAGS.reference_python, FLAGS.refbench) if FLAGS.reference else None
  if FLAGS.reference and ref is None:
    print("note: no reference in $REFBENCH (see ../shared/refbench/README.md): timing ours only", flush=True)
  result = {"host": common.host(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv),
            "reference": bool(ref), "reference_device": FLAGS.reference_device, "rows": {}}
  result["matmul_gflops"] = run_ours("matmul")["matmul_gflops"]
  for name in FLAGS.rows:
    kind, dataset, batch, _, ref_args = ROWS[name]
    batch = FLAGS.batch or batch
    row = {"kind": kind, "dataset": dataset, "batch": batch}
    print(f"=== {time.strftime('%H:%M:%S')} {name}", flush=True)
    if ref and ref_args:
      try:
        row["reference"] = run_reference(ref, name, batch, ref_args, FLAGS.reference_device,
                                         FLAGS.reference_huge_pages)
      except RuntimeError as e:
        row["reference_error"] = str(e)
    try:
      row["ours"] = run_ours(name)
    except RuntimeError as e:
      row["ours"] = {"error": str(e)}
    if "reference" in row and "s_per_step" in row["ours"]:
      row["speedup"] = row["reference"]["s_per_step"] / row["ours"]["s_per_step"]
      row["rss_ratio"] = row["ours"]["peak_rss_gb"] / row["reference"]["peak_rss_gb"]
    print(json.dumps(row), flush=True)
    result["rows"][name] = row
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:                # after every row: a stopped run keeps what it measured
      json.dump(result, f, indent=1)
  print(table(result))


if __name__ == "__main__":
  app.run(main)
