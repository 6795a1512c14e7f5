"""ε-space Langevin sampling, potentials, energy networks, replay buffer, EBM optimiser."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.helpers import golden, golden_variables, nchw_to_nhwc, tiny_nvae
from vaebm_jax import optim, parallel, sampling
from vaebm_jax.models import torch_import
from vaebm_jax.models.energy import EnergyNet


@pytest.fixture(scope="module")
def tiny():
  vae = tiny_nvae()
  x = jax.random.uniform(jax.random.key(0), (8, 16, 16, 1))
  vv = jax.jit(vae.init, static_argnums=2)({"params": jax.random.key(1), "sample": jax.random.key(2)}, x, True)
  ebm = EnergyNet("mnist", 4)
  ev = jax.jit(ebm.init)(jax.random.key(3), x)      # eager init of a Linen module runs op by op: slow
  params = {"vae": {"params": vv["params"], "batch_stats": vv["batch_stats"]}, "ebm": {"params": ev["params"]}}
  return vae, ebm, params


def test_langevin_chain_recovers_gaussian_moments():
  mu, sigma = jnp.array([1.0, -2.0]), jnp.array([0.5, 2.0])
  potential = lambda e: (jnp.sum(0.5 * jnp.square((e - mu) / sigma), axis=-1), jnp.zeros(e.shape[0]))
  eps = jnp.zeros((4000, 2))
  final, energies, _ = jax.jit(functools.partial(sampling.langevin_chain, potential=potential, num_steps=3000,
                                                 step_size=0.02, unroll=8))(eps, jax.random.key(0))
  np.testing.assert_allclose(jnp.mean(final, 0), mu, atol=0.06)
  np.testing.assert_allclose(jnp.std(final, 0), sigma, rtol=0.05)
  assert energies.shape == (3000, 4000) and jnp.mean(energies[-1]) < jnp.mean(energies[0]) + 1.0


@pytest.mark.parametrize("potential", ["code", pytest.param("paper", marks=pytest.mark.slow)])
def test_potential_gradient_matches_finite_differences(tiny, potential):
  vae, ebm, params = tiny
  eps_z, eps_x = sampling.initial_noise(jax.random.key(5), vae, 3)
  u = jax.jit(lambda e: jnp.sum(sampling.potential_fn(e[0], e[1], params, vae=vae, ebm=ebm,
                                                      potential=potential)[0]))
  eps = (eps_z, eps_x)
  grad = jax.grad(u)(eps)
  leaves, treedef = jax.tree.flatten(eps)
  direction = jax.tree.unflatten(treedef, [jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate(leaves)])
  h = 1e-2
  shift = lambda s: jax.tree.map(lambda e, d: e + s * h * d, eps, direction)
  numeric = (u(shift(1.0)) - u(shift(-1.0))) / (2 * h)
  analytic = sum(jnp.sum(g * d) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction), strict=True))
  np.testing.assert_allclose(numeric, analytic, rtol=2e-2)


@pytest.mark.slow
def test_paper_potential_with_zero_energy_leaves_standard_normal_invariant(tiny):
  vae, ebm, params = tiny
  zero_ebm = jax.tree.map(jnp.zeros_like, params["ebm"])
  params = {**params, "ebm": zero_ebm}
  eps = sampling.initial_noise(jax.random.key(0), vae, 64)
  potential = lambda e: sampling.potential_fn(e[0], e[1], params, vae=vae, ebm=ebm, potential="paper")
  final, _, aux = jax.jit(functools.partial(sampling.langevin_chain, potential=potential, num_steps=40,
                                            step_size=0.05))(eps, jax.random.key(1))
  assert float(jnp.max(jnp.abs(aux))) == 0.0                  # E ≡ 0
  values = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(final)])
  assert abs(values.mean()) < 0.02
  np.testing.assert_allclose(values.var(), 1.0 / (1.0 - 0.05 / 4), rtol=0.03)   # ULA's stationary variance
  # and the chain moved: the states decorrelated from where they started
  start = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(eps)])
  assert np.corrcoef(start, values)[0, 1] < 0.5


def test_sample_fn_is_deterministic_and_the_same_on_one_and_four_devices_for_any_count(tiny):
  """6 chains on 4 devices: padded to 8, split 2 per device, the padding dropped; the same samples and
  energies as on one device."""
  vae, ebm, params = tiny
  kw = dict(vae=vae, ebm=ebm, num_samples=6, num_steps=2, step_size=1e-3, return_energies=True)
  results = []
  for devices in (jax.devices()[:1], jax.devices()[:4]):
    draw = jax.jit(functools.partial(sampling.sample_fn, mesh=parallel.create_mesh(devices), **kw))
    images, extras = draw(jax.random.key(7), params)
    results.append((np.asarray(images), np.asarray(extras["energies"])))
    again, _ = draw(jax.random.key(7), params)
    np.testing.assert_array_equal(np.asarray(again), results[-1][0])
  np.testing.assert_allclose(results[0][0], results[1][0], atol=1e-5)
  np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5)
  assert results[0][0].shape == (6, 16, 16, 1) and results[0][0].min() >= 0.0 and results[0][0].max() <= 1.0
  assert results[0][1].shape == (2, 6)
  # the padded chains really are split over the 4 devices (2 each), not run on one
  hlo = draw.lower(jax.random.key(7), params).compile().as_text()
  assert "f32[2,16,16,1]" in hlo
  other, _ = draw(jax.random.key(8), params)
  assert not np.allclose(np.asarray(other), results[1][0])


@pytest.mark.slow
def test_sample_fn_continues_chains_from_init_and_reports_every_step(tiny):
  vae, ebm, params = tiny
  kw = dict(vae=vae, ebm=ebm, num_samples=4, num_steps=3, step_size=1e-3, return_eps=True, return_energies=True)
  draw = jax.jit(functools.partial(sampling.sample_fn, **kw))
  images, extras = draw(jax.random.key(0), params)
  init = (extras["eps_z"], extras["eps_x"])
  potential = jax.jit(lambda e: sampling.potential_fn(e[0], e[1], params, vae=vae, ebm=ebm))
  decode = jax.jit(lambda e: vae.decode_from_eps(params["vae"], e[0], e[1])["mean"])
  # the returned state is the one the images were decoded from
  np.testing.assert_allclose(np.clip(np.asarray(decode(init)), 0, 1), np.asarray(images), atol=1e-6)
  # U and E of every sample at the start of every step
  assert extras["energies"].shape == extras["ebm_energies"].shape == (3, 4)
  u0, e0 = potential(sampling.initial_noise(jax.random.split(jax.random.key(0))[0], vae, 4))
  np.testing.assert_allclose(np.asarray(extras["energies"][0]), np.asarray(u0), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(extras["ebm_energies"][0]), np.asarray(e0), rtol=1e-5, atol=1e-5)
  # continuing starts from where the chains stopped, not from fresh noise
  _, more = draw(jax.random.key(1), params, init=init)
  np.testing.assert_allclose(np.asarray(more["energies"][0]), np.asarray(potential(init)[0]), rtol=1e-5)
  assert not np.allclose(np.asarray(more["energies"][0]), np.asarray(extras["energies"][0]))
  with pytest.raises(ValueError, match="init does not fit num_samples=4"):
    draw(jax.random.key(1), params, init=(init[0], init[1][:2]))


def test_sample_fn_pins_float32_matmul_precision(tiny):
  """CPU computes float32 either way, so check what runs: every conv and matmul of the sampler
  (potential, its ε-gradient, the final decode) carries precision HIGHEST, even under a global
  lower default (as TPUs and recent GPUs have)."""
  vae, ebm, params = tiny
  draw = jax.jit(functools.partial(sampling.sample_fn, vae=vae, ebm=ebm, num_samples=4, num_steps=2, step_size=1e-3))
  with jax.default_matmul_precision("bfloat16"):
    text = draw.lower(jax.random.key(0), params).as_text()
  ops = [line for line in text.splitlines() if "stablehlo.convolution" in line or "stablehlo.dot_general" in line]
  assert len(ops) > 20
  assert all("HIGHEST" in line for line in ops), [line for line in ops if "HIGHEST" not in line][:2]
  # and the pin is what makes it so: the same network outside the sampler follows the global default
  with jax.default_matmul_precision("bfloat16"):
    plain = jax.jit(lambda p, x: ebm.apply(p, x)).lower(params["ebm"], jnp.zeros((4, 16, 16, 1))).as_text()
  assert "HIGHEST" not in plain


def test_data_dependent_init_standardises_every_conv():
  x = jax.random.uniform(jax.random.key(0), (40, 16, 16, 3))
  ebm = EnergyNet("mnist", 8)
  variables = ebm.init(jax.random.key(1), x)
  _, state = ebm.apply(variables, x, capture_intermediates=lambda mdl, _: type(mdl).__name__ == "Conv2D",
                       mutable=["intermediates"])
  outputs = jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]
  assert len(outputs) == 1 + 2 * 4 + 2     # first conv, two per block, two 1×1 skips
  for path, out in outputs:
    flat = np.asarray(out).reshape(-1, out.shape[-1])
    if "skip" not in jax.tree_util.keystr(path):   # the 1×1 skips have no bias to remove the mean
      np.testing.assert_allclose(flat.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(flat.std(0, ddof=1), 0.2, rtol=1e-3)


def test_energy_net_parameter_counts_match_reference():
  for arch, c, size, expected in (("cifar10", 128, 32, 5_137_921), ("celeba64", 64, 64, 4_337_537)):
    shapes = jax.eval_shape(lambda x, arch=arch, c=c: EnergyNet(arch, c).init(jax.random.key(0), x),
                            jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32))
    assert sum(np.prod(p.shape) for p in jax.tree.leaves(shapes["params"])) == expected


def test_summary_counts_grayscale_energy_nets_with_one_input_channel():
  from configs import digits_ebm
  from vaebm_jax import evaluate
  config = digits_ebm.get_config()
  shapes = jax.eval_shape(lambda x: EnergyNet("mnist", config.ebm.n_channel).init(jax.random.key(0), x),
                          jax.ShapeDtypeStruct((2, 16, 16, 1), jnp.float32))
  expected = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes["params"]))
  assert evaluate.parameter_summary(config).splitlines()[-1] == f"total_params: {expected}"


def test_energy_and_potential_match_official_implementation():
  d = golden()
  vae, vae_variables, ebm_variables = golden_variables(d)
  params = {"vae": vae_variables, "ebm": ebm_variables}
  ebm = EnergyNet("cifar10", int(d["meta/ebm_channels"]), data_init=False)
  x = nchw_to_nhwc(d["in/x_data"])
  torch_import.check_against(params["ebm"], jax.eval_shape(ebm.init, jax.random.key(0), x))
  np.testing.assert_allclose(jax.jit(ebm.apply)(params["ebm"], x), d["out/energy_data"], rtol=1e-4, atol=1e-5)
  eps_z = [nchw_to_nhwc(d[f"in/eps_z/{i}"]) for i in range(vae.num_groups)]
  eps_x = nchw_to_nhwc(d["in/eps_x"])
  u, energy = jax.jit(lambda e: sampling.potential_fn(e[0], e[1], params, vae=vae, ebm=ebm))((eps_z, eps_x))
  np.testing.assert_allclose(energy, d["out/energy"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(u, d["out/U"], rtol=1e-5)
  grads = jax.jit(jax.grad(lambda e: jnp.sum(sampling.potential_fn(e[0], e[1], params, vae=vae, ebm=ebm)[0])))(
      (eps_z, eps_x))
  for i in range(vae.num_groups):
    np.testing.assert_allclose(grads[0][i], nchw_to_nhwc(d[f"out/dU_deps_z/{i}"]), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(grads[1], nchw_to_nhwc(d["out/dU_deps_x"]), rtol=1e-4, atol=1e-5)


@pytest.mark.slow     # ~25 s: four compiles of the golden model
def test_bf16_networks_keep_the_sampler_within_float32_tolerance():
  """conv_dtype='bfloat16' in both networks (for accelerators), on the golden model at CIFAR-10's step
  size: U stays within 1e-4 of float32; the error of ∇U moves a Langevin step by under 1e-3 of its noise
  √η·ξ (so the chain's law is float32's); and the images of a short chain from the same ε₀ and noise
  differ by under half a grey level of 1/255."""
  d = golden()
  base, vae_variables, ebm_variables = golden_variables(d)
  params = {"vae": vae_variables, "ebm": ebm_variables}
  eps = ([nchw_to_nhwc(d[f"in/eps_z/{i}"]) for i in range(base.num_groups)], nchw_to_nhwc(d["in/eps_x"]))
  step_size = 8e-5
  results = {}
  for dtype in ("float32", "bfloat16"):
    vae = base.clone(conv_dtype=dtype)
    ebm = EnergyNet("cifar10", int(d["meta/ebm_channels"]), data_init=False, conv_dtype=dtype)
    potential = lambda e, vae=vae, ebm=ebm: sampling.potential_fn(e[0], e[1], params, vae=vae, ebm=ebm)

    def run(e, key, vae=vae, potential=potential):
      grads, u = jax.grad(lambda e: (jnp.sum(potential(e)[0]), potential(e)[0]), has_aux=True)(e)
      final, _, _ = sampling.langevin_chain(e, key, potential, num_steps=3, step_size=step_size)
      return u, grads, vae.decode_from_eps(params["vae"], final[0], final[1])["mean"]

    run = jax.jit(run)
    text = run.lower(eps, jax.random.key(0)).as_text()
    convs = [line for line in text.splitlines() if "stablehlo.convolution" in line]
    results[dtype] = run(eps, jax.random.key(0))
    results[dtype + "_bf16_convs"] = sum("xbf16>" in line.rsplit("->", 1)[0] for line in convs) / len(convs)
  assert results["float32_bf16_convs"] == 0 and results["bfloat16_bf16_convs"] > 0.95   # bf16 really ran
  (u32, g32, x32), (u16, g16, x16) = results["float32"], results["bfloat16"]
  np.testing.assert_allclose(u16, u32, rtol=1e-4)
  g32, g16 = (np.concatenate([np.ravel(a) for a in jax.tree.leaves(g)]) for g in (g32, g16))
  drift_error = 0.5 * step_size * np.linalg.norm(g16 - g32) / np.sqrt(g32.size)   # per coordinate, as (η/2)∇U
  assert 0 < drift_error < 1e-3 * np.sqrt(step_size)
  assert 0 < np.max(np.abs(np.asarray(x16) - np.asarray(x32))) < 0.5 / 255


@pytest.mark.slow     # ~12 s: four compiles
def test_sample_fn_with_bf16_networks_returns_images_decoded_in_float32(tiny):
  """With conv_dtype='bfloat16' the chain runs bf16 convolutions, but the returned images are decoded in
  float32: with no Langevin step they are float32's exactly, and after steps they differ (the chain did
  run in bf16)."""
  vae, ebm, params = tiny
  draw = lambda v, e, steps: jax.jit(functools.partial(
      sampling.sample_fn, vae=v, ebm=e, num_samples=4, num_steps=steps, step_size=1e-2))(jax.random.key(0), params)
  low = vae.clone(conv_dtype="bfloat16"), ebm.clone(conv_dtype="bfloat16")
  np.testing.assert_array_equal(draw(*low, 0), draw(vae, ebm, 0))
  assert not np.array_equal(draw(*low, 2), draw(vae, ebm, 2))


def test_igebm_clip_matches_its_formula():
  lr, wd, b1, b2 = 0.1, 0.01, 0.99, 0.999
  tx = optim.ebm_optimizer(lr, wd, b1, b2)
  theta = {"w": jnp.array([1.0, -1.0, 0.5])}
  state = tx.init(theta)
  g1, g2 = np.array([0.1, 0.2, -0.3]), np.array([5.0, -0.01, -4.0])
  u1, state = tx.update({"w": jnp.asarray(g1)}, state, theta)           # step 0: no clip
  theta1 = optax.apply_updates(theta, u1)
  u2, state = tx.update({"w": jnp.asarray(g2)}, state, theta1)
  # by hand: v̂ after step 1 from the gradient Adam saw (g1 + wd θ0)
  seen1 = g1 + wd * np.array([1.0, -1.0, 0.5])
  v_hat = (1 - b2) * seen1 ** 2 / (1 - b2)
  bound = 3 * np.sqrt(v_hat) + 0.1
  clipped = np.clip(g2, -bound, bound)
  seen2 = clipped + wd * np.asarray(theta1["w"])
  m = b1 * (1 - b1) * seen1 + (1 - b1) * seen2
  v = b2 * (1 - b2) * seen1 ** 2 + (1 - b2) * seen2 ** 2
  expected = -lr * (m / (1 - b1 ** 2)) / (np.sqrt(v / (1 - b2 ** 2)) + 1e-8)
  np.testing.assert_allclose(u2["w"], expected, rtol=1e-4)
  assert abs(clipped[0]) < abs(g2[0])     # the clip acted


def test_replay_buffer_anneal_fifo_and_replay():
  np.testing.assert_allclose([sampling.replay_probability(s, 0.6, 100) for s in (0, 50, 100, 500)],
                             [0.0, 0.3, 0.6, 0.6], rtol=1e-6)
  vae = tiny_nvae()
  buffer = sampling.init_replay_buffer(vae, capacity=10)
  batch = lambda v: [jnp.full((4,) + s, v, jnp.float32) for s in vae.latent_shapes()]
  fresh = [-jnp.ones((4,) + s) for s in vae.latent_shapes()]
  eps, n = sampling.sample_initial_eps_z(buffer, jax.random.key(0), fresh, 1.0)   # empty: all fresh
  assert int(n) == 0 and float(eps[0].max()) == -1.0
  for v in range(4):                       # 16 pushes into capacity 10: entries of 1.5 batches survive
    buffer = sampling.push_replay_buffer(buffer, [b + jnp.arange(4.0).reshape(4, 1, 1, 1) / 10 for b in batch(v)])
  assert buffer.size.tolist() == [10] and buffer.pointer.tolist() == [6]
  skipped = sampling.push_replay_buffer(buffer, batch(9), keep=jnp.asarray(False))   # a skipped update
  jax.tree.map(np.testing.assert_array_equal, skipped, buffer)
  kept = sorted(round(float(v), 1) for v in buffer.eps_z[0][0, :, 0, 0, 0])
  assert kept == sorted([1.2, 1.3] + [2.0, 2.1, 2.2, 2.3] + [3.0, 3.1, 3.2, 3.3])   # the oldest dropped
  eps, n = sampling.sample_initial_eps_z(buffer, jax.random.key(1), fresh, 1.0)
  drawn = {round(float(v), 1) for v in eps[0][:, 0, 0, 0]}
  assert int(n) == 4 and len(drawn) == 4 and drawn <= set(kept)      # without replacement, from the buffer
  eps, n = sampling.sample_initial_eps_z(buffer, jax.random.key(2), fresh, 0.0)
  assert int(n) == 0 and float(eps[0].max()) == -1.0
  counts = [int(sampling.sample_initial_eps_z(buffer, jax.random.key(k), fresh, 0.5)[1]) for k in range(200)]
  assert 1.7 < np.mean(counts) < 2.3                                      # Bernoulli(0.5) per slot
  eps, n = sampling.sample_initial_eps_z(buffer, jax.random.key(3), fresh, 0.5)
  replayed = np.asarray(eps[0][:, 0, 0, 0]) >= 0
  assert replayed.sum() == int(n) and replayed[:int(n)].all()          # replayed samples come first


def test_replay_buffer_keeps_one_shard_per_device_and_moves_no_entry_between_devices():
  """The reference's one buffer per GPU process: device d pushes and replays its own rows only."""
  vae = tiny_nvae()
  mesh = parallel.create_mesh()
  shards = mesh.size
  buffer = sampling.init_replay_buffer(vae, capacity=3, num_shards=shards)
  shardings = sampling.buffer_shardings(buffer, mesh)
  buffer = jax.device_put(buffer, shardings)
  rows = 2 * shards
  sharded = parallel.data_sharded(mesh)
  # Rows 2d, 2d+1 belong to device d; their values say which device and which push.
  batch = lambda push: [jax.device_put(jnp.broadcast_to(
      (jnp.arange(rows) // 2 * 10 + push).astype(jnp.float32).reshape((rows, 1, 1, 1)), (rows,) + s), sharded)
      for s in vae.latent_shapes()]
  push = jax.jit(sampling.push_replay_buffer, out_shardings=shardings)
  for p in range(3):
    buffer = push(buffer, batch(p))
  assert buffer.size.tolist() == [3] * shards and buffer.pointer.tolist() == [0] * shards   # 6 pushed, 3 kept
  assert buffer.eps_z[0].sharding.spec == jax.sharding.PartitionSpec("data")
  for d in range(shards):                   # the newest 3 of device d's 6 rows, nothing from elsewhere
    assert sorted(np.asarray(buffer.eps_z[0][d, :, 0, 0, 0]).tolist()) == [10 * d + 1, 10 * d + 2, 10 * d + 2]
  fresh = [jax.device_put(-jnp.ones((rows,) + s), sharded) for s in vae.latent_shapes()]
  draw = jax.jit(lambda b, k, f: sampling.sample_initial_eps_z(b, k, f, 1.0))
  eps, n = draw(buffer, jax.random.key(0), fresh)
  assert int(n) == rows
  assert (np.asarray(eps[0][:, 0, 0, 0]) // 10 == np.arange(rows) // 2).all()   # each row from its own device
  entries_only = jax.jit(lambda b, k, f: sampling.sample_initial_eps_z(b, k, f, 1.0)[0])   # not the count
  hlo = entries_only.lower(buffer, jax.random.key(0), fresh).compile().as_text() + \
      push.lower(buffer, batch(0)).compile().as_text()
  assert not any(op in hlo for op in ("all-gather", "all-to-all", "collective-permute", "all-reduce")), \
      "a buffer entry crossed devices"
