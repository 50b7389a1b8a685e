"""A written model (not a measurement) of the in-step mining all-gather on a pod.

    python benchmarks/mining_allgather_model.py [--dim 2048 --per_chip 8 --image 362 ...]

In-step mining (mining.py) all-gathers the L2-normalised descriptors of the global batch so
that every chip can rank its anchors against all B images: each chip ends up holding
D x B x 4 bytes (float32), and the backward pass moves the same amount back (the gather's
transpose, a reduce-scatter of the descriptor gradients). The step's compute is estimated
from FLOPs: ResNet-101 at 224 px costs 7.8 GMACs forward (He et al. 2016), scaled by pixel
count, and a training step costs ~3x the forward pass. Every assumption is a flag.
"""
import argparse


def model(chips: int, a) -> dict:
  """One row: bytes gathered, modelled compute and gather times (fwd + bwd), gather share."""
  global_batch = a.per_chip * chips
  row = a.dim * a.per_chip * 4                              # one chip's descriptors, bytes
  gathered = row * chips                                    # = D x B x 4, held by every chip
  local = min(chips, a.ici_chips)                           # chips reached over ICI
  # A torus all-gather runs one ring per dimension: ~3 (n^(1/3) - 1) latency-bound steps.
  hops = 3 * (round(local ** (1 / 3)) - 1) if local > 8 else local - 1
  t_ici = row * (local - 1) / (a.ici_gbs * 1e9) + hops * a.hop_us * 1e-6
  # Beyond one ICI slice, the other slices' rows cross the data-centre network.
  t_dcn = row * (chips - local) / (a.dcn_gbs_per_chip * 1e9)
  t_comm = 2 * (t_ici + t_dcn)                              # gather + its transpose
  flops = 3 * 2 * a.gmacs_224 * 1e9 * (a.image / 224) ** 2 * a.per_chip
  t_step = flops / (a.peak_tflops * 1e12 * a.mfu)
  return dict(chips=chips, B=global_batch, mib=gathered / 2**20, t_step_ms=t_step * 1e3,
              t_comm_ms=t_comm * 1e3, share=t_comm / (t_step + t_comm))


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--dim", type=int, default=2048, help="descriptor dimension D (ResNet-101 GeM)")
  p.add_argument("--per_chip", type=int, default=8, help="images per chip per step")
  p.add_argument("--image", type=int, default=362, help="training crop side (the reference's)")
  p.add_argument("--gmacs_224", type=float, default=7.8, help="ResNet-101 forward GMACs, 224 px")
  p.add_argument("--peak_tflops", type=float, default=275.0, help="chip bf16 peak (TPU v4)")
  p.add_argument("--mfu", type=float, default=0.4, help="achieved fraction of peak")
  p.add_argument("--ici_gbs", type=float, default=90.0,
                 help="per-chip all-gather bandwidth over ICI, GB/s (two v4 links)")
  p.add_argument("--hop_us", type=float, default=2.0, help="latency per ring step, us")
  p.add_argument("--ici_chips", type=int, default=256, help="chips in one ICI slice")
  p.add_argument("--dcn_gbs_per_chip", type=float, default=6.25,
                 help="data-centre network per chip between slices, GB/s (200 Gb/s per 4-chip host)")
  p.add_argument("--chips", default="8,64,256,1024")
  a = p.parse_args()
  print("| chips | global batch | gathered per chip | step compute | gather fwd+bwd | share |")
  print("|---:|---:|---:|---:|---:|---:|")
  for n in (int(c) for c in a.chips.split(",")):
    r = model(n, a)
    print(f"| {r['chips']} | {r['B']} | {r['mib']:.1f} MiB | {r['t_step_ms']:.1f} ms | "
          f"{r['t_comm_ms']:.2f} ms | {100 * r['share']:.1f}% |")


if __name__ == "__main__":
  main()
