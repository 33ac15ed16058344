"""The cost of sCM's tangent, in one run: a JVP tangent (``torch.func.jvp``, F⁻ and cos t sin t·σ_d·
dF⁻/dt in one forward-mode pass), the same JVP through torch's built-in forward-mode rules for
convolution and GroupNorm (the path before the EDM layers wrote theirs out) and a
finite-difference tangent (F⁻ plus two evaluations on float64 copies of the weights), each as a
ratio to one no-grad forward of the same network — the student's F as the sCD/sCT distiller calls it (``gdistill.distillers.consistency.tangent_terms``).

    python benchmarks/scm_tangent_cost.py                      # a small DDPM++ UNet, 32x32
    python benchmarks/scm_tangent_cost.py --net toy --batch 1024
    python benchmarks/scm_tangent_cost.py --net cifar10 --batch 8   # EDM's CIFAR-10 network

Times are medians over ``--repeats`` interleaved rounds after a warm-up; on CUDA every timed
call is synchronised.
"""
import argparse
import math
import os.path as osp
import statistics
import sys
import time

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from gdistill.distillers.consistency import tangent_terms  # noqa: E402
from gdistill.networks.edm import EDMPrecond  # noqa: E402
from gdistill.networks.edm import layers as edm_layers  # noqa: E402
from gdistill.networks.mlp import MLPDenoiser  # noqa: E402
from gdistill.networks.trigflow import TrigFlowStudent  # noqa: E402

NETS = {
    'toy': lambda: MLPDenoiser(dim=2, hidden=256, depth=3),
    'small-unet': lambda: EDMPrecond(img_resolution=32, img_channels=3, model_type='SongUNet', model_channels=64,
                                     channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[16], dropout=0.0),
    # EDM's DDPM++ CIFAR-10 network (55.7 M parameters)
    'cifar10': lambda: EDMPrecond(img_resolution=32, img_channels=3, model_type='SongUNet', model_channels=128,
                                  channel_mult=[2, 2, 2], embedding_type='positional', encoder_type='standard',
                                  decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1],
                                  augment_dim=9, dropout=0.0),
}


builtin_forward_ad = edm_layers.builtin_forward_ad


def timed(fn, device):
    if device.type == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--net', choices=sorted(NETS), default='small-unet')
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    student = TrigFlowStudent(NETS[args.net](), sigma_data=0.5).to(device).train()
    shape = (2,) if args.net == 'toy' else (3, 32, 32)
    x_in = torch.randn((args.batch,) + shape, device=device)
    t = torch.rand(args.batch, device=device) * 1.4 + 0.1
    dxdt = torch.randn_like(x_in)

    def forward():
        with torch.no_grad():
            student.F(x_in, t)

    def jvp():
        tangent_terms(student, x_in, t, dxdt, 0.5, seed=0, method='jvp')

    def fd():
        tangent_terms(student, x_in, t, dxdt, 0.5, seed=0, method='finite_difference')

    def jvp_builtin():
        # the same JVP through torch's own forward-mode rules for convolution and GroupNorm
        # (zero-tangent weight convolutions, a decomposed GroupNorm): the path before
        # gdistill.networks.edm.layers wrote them out
        with builtin_forward_ad():
            jvp()

    runs = dict(forward=forward, jvp=jvp, jvp_builtin=jvp_builtin, finite_difference=fd)
    for fn in runs.values():                       # warm-up (allocations, kernels)
        fn()
    times = {k: [] for k in runs}
    for _ in range(args.repeats):
        for k, fn in runs.items():
            times[k].append(timed(fn, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    params = sum(p.numel() for p in student.network.parameters())
    threads = torch.get_num_threads() if device.type == 'cpu' else '-'
    print(f'network {args.net} ({params / 1e6:.2f} M parameters), batch {args.batch}, device {device}, '
          f'threads {threads}, median of {args.repeats}')
    print('| tangent | ms | × no-grad forward |')
    print('|---|---|---|')
    labels = dict(forward='no-grad forward of F', jvp='JVP tangent (F⁻ + dF⁻/dt)',
                  jvp_builtin="JVP tangent, torch's built-in conv/GroupNorm rules",
                  finite_difference='finite-difference tangent (F⁻ + 2 float64 evaluations)')
    for k in runs:
        print(f'| {labels[k]} | {1e3 * med[k]:.1f} | {med[k] / med["forward"]:.2f} |')
    if not all(math.isfinite(v) for v in med.values()):
        raise SystemExit('a timing was not finite')
    return med


if __name__ == '__main__':
    main()
