"""Why CPU extraction was slow: XLA CPU's grouped (depthwise) convolution vs its fused taps.

  python benchmarks/cpu_conv.py            # [4, 192, 256, 144], MobileNetV2's stride-4 block
  python benchmarks/cpu_conv.py --quick

Times one 3x3 depthwise layer as XLA's grouped convolution (`layers._depthwise_conv`) and as
9 shifted multiply-adds (`layers._depthwise_taps`, what `DepthwiseConv` runs on CPU), and a
1x1 convolution as a convolution and as a matmul. Prints ms per call and ms per CPU-second
ratio (CPU time of this process, all threads).
"""
import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax.models import layers
# pylint: enable=g-import-not-at-top,wrong-import-position


def _cpu_s() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def bench(fn, *args, repeats: int = 5):
  """(ms per call, CPU-ms per call) after one compiling call."""
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  t, c = time.perf_counter(), _cpu_s()
  for _ in range(repeats):
    jax.block_until_ready(fn(*args))
  return ((time.perf_counter() - t) / repeats * 1e3, (_cpu_s() - c) / repeats * 1e3)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args(argv)
  b, h, w, c = (1, 16, 16, 8) if args.quick else (4, 192, 256, 144)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((b, h, w, c)), jnp.float32)
  k3 = jnp.asarray(rng.standard_normal((3, 3, 1, c)), jnp.float32)
  k1 = jnp.asarray(rng.standard_normal((1, 1, c, 24)), jnp.float32)
  dn = ("NHWC", "HWIO", "NHWC")
  # pylint: disable=protected-access
  cases = {
      "depthwise 3x3, grouped convolution": (
          lambda a, k: layers._depthwise_conv(a, k, stride=1), k3),
      "depthwise 3x3, fused taps": (lambda a, k: layers._depthwise_taps(a, k, stride=1), k3),
      "1x1, convolution": (lambda a, k: jax.lax.conv_general_dilated(
          a, k, (1, 1), "VALID", dimension_numbers=dn), k1),
      "1x1, matmul": (lambda a, k: a @ k[0, 0], k1),
  }
  # pylint: enable=protected-access
  results = {}
  print(f"x {x.shape}, load average {os.getloadavg()[0]:.1f}")
  for name, (fn, k) in cases.items():
    ms, cpu_ms = bench(fn, x, k)
    results[name] = (ms, cpu_ms)
    print(f"{name:36s} {ms:8.1f} ms  {cpu_ms:8.1f} CPU-ms")
  np.testing.assert_allclose(np.asarray(cases["depthwise 3x3, fused taps"][0](x, k3)),
                             np.asarray(cases["depthwise 3x3, grouped convolution"][0](x, k3)),
                             rtol=1e-4, atol=1e-4)
  return results


if __name__ == "__main__":
  main()
