"""extract.described_rows keeps one batch in flight and trims large partial batches on CPU:
neither may change which rows come back or their descriptors."""
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax import extract
from retrieval_jax import sharding


def test_trim_partial_batch_cuts_to_a_power_of_two_and_keeps_the_rows():
  index = np.array([7, 2, 5] + [-1] * 13, np.int32)
  batch = {"index": index, "image": np.arange(16 * 2 * 2 * 3).reshape(16, 2, 2, 3),
           "mask": np.ones((16, 2, 2), bool)}
  cut = extract.trim_partial_batch(batch, 1, min_pixels=0)
  assert cut["image"].shape[0] == 4 and cut["mask"].shape[0] == 4
  np.testing.assert_array_equal(cut["index"], [7, 2, 5, -1])
  np.testing.assert_array_equal(cut["image"], batch["image"][:4])
  # Rows stay a multiple of the data parallelism; full batches and small padding stay.
  assert extract.trim_partial_batch(batch, 8, min_pixels=0)["index"].shape == (8,)
  assert extract.trim_partial_batch(batch, 1)["index"].shape == (16,)  # 4 Mpx rule
  full = dict(batch, index=np.arange(16, dtype=np.int32))
  assert extract.trim_partial_batch(full, 1, min_pixels=0) is full
  # Padding rows in the middle: not the pipeline's layout, left alone.
  odd = dict(batch, index=np.array([1, -1, 3] + [-1] * 13, np.int32))
  assert extract.trim_partial_batch(odd, 1, min_pixels=0) is odd


def test_described_rows_in_flight_order_matches_batch_by_batch():
  mesh = sharding.make_mesh()
  dp = sharding.data_parallelism(mesh)
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)
  describe = jax.jit(
      lambda v, x, m: (x.astype(jnp.float32).mean((1, 2)) @ v) * m.any((1, 2))[:, None])
  batches = []
  for b in range(4):
    index = np.arange(b * dp, (b + 1) * dp, dtype=np.int32)
    if b == 3:
      index[dp // 2:] = -1
    batches.append({"image": rng.integers(0, 255, (dp, 4, 4, 3), np.uint8),
                    "mask": np.ones((dp, 4, 4), bool), "index": index})
  got = list(extract.described_rows(describe, w, iter(batches), mesh))
  assert len(got) == 4
  for (rows, d), batch in zip(got, batches):
    keep = batch["index"] >= 0
    np.testing.assert_array_equal(rows, batch["index"][keep])
    want = batch["image"].astype(np.float32).mean((1, 2)) @ np.asarray(w)
    np.testing.assert_allclose(d, want[keep], rtol=1e-5, atol=1e-5)
