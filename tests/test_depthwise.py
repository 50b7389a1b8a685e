"""DepthwiseConv: the CPU form (shifted multiply-adds) and XLA's grouped convolution both
equal torch's `conv2d(groups=C)` with padding (k-1)//2, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retrieval_jax.models import layers


def _torch_depthwise(x, kernel, stride):
  """x [B, H, W, C], kernel [k, k, 1, C] (Flax) -> torch conv2d(groups=C), NHWC out."""
  k = kernel.shape[0]
  xt = torch.tensor(np.transpose(x, (0, 3, 1, 2)), dtype=torch.float64, requires_grad=True)
  wt = torch.tensor(np.transpose(kernel, (3, 2, 0, 1)), dtype=torch.float64,
                    requires_grad=True)  # [C, 1, k, k]
  y = F.conv2d(xt, wt, stride=stride, padding=(k - 1) // 2, groups=x.shape[-1])
  return xt, wt, y


@pytest.mark.parametrize("k,stride,hw", [(3, 1, (9, 11)), (3, 2, (9, 11)), (3, 2, (8, 10)),
                                         (5, 2, (7, 12))])
def test_both_forms_equal_torch_conv2d_groups(k, stride, hw):
  rng = np.random.default_rng(k * 10 + stride)
  x = rng.standard_normal((2, *hw, 6)).astype(np.float32)
  kernel = rng.standard_normal((k, k, 1, 6)).astype(np.float32)
  g = rng.standard_normal
  xt, wt, yt = _torch_depthwise(x, kernel, stride)
  want = np.transpose(yt.detach().numpy(), (0, 2, 3, 1))
  cot = g(want.shape).astype(np.float32)
  (yt * torch.tensor(np.transpose(cot, (0, 3, 1, 2)), dtype=torch.float64)).sum().backward()
  want_gx = np.transpose(xt.grad.numpy(), (0, 2, 3, 1))
  want_gk = np.transpose(wt.grad.numpy(), (2, 3, 1, 0))
  for form in (layers._depthwise_taps, layers._depthwise_conv):  # pylint: disable=protected-access
    fn = lambda a, b: form(a, b, stride=stride)  # pylint: disable=cell-var-from-loop
    y, vjp = jax.vjp(fn, jnp.asarray(x), jnp.asarray(kernel))
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    gx, gk = vjp(jnp.asarray(cot))
    np.testing.assert_allclose(np.asarray(gx), want_gx, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(gk), want_gk, rtol=1e-5, atol=1e-4)


def test_module_keeps_nn_conv_param_layout_and_cpu_uses_the_taps():
  x = jnp.ones((1, 8, 8, 4))
  conv = layers.ConvBN(4, 3, 2, groups=4)
  variables = conv.init(jax.random.key(0), x)
  assert variables["params"]["conv"]["kernel"].shape == (3, 3, 1, 4)
  module = layers.DepthwiseConv(3, 2)
  hlo = jax.jit(lambda v, a: module.apply(v, a)).lower(
      {"params": variables["params"]["conv"]}, x).as_text()
  assert "convolution" not in hlo  # the CPU branch is elementwise
