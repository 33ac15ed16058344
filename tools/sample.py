"""Draw samples from a trained distiller.

    python tools/sample.py CONFIG CHECKPOINT [--steps K] [--num N] [--out DIR] [--seed S]
        [--teacher] [--precision fp32|bf16] [--cfg-options k=v ...]

Writes ``samples_nfe{K}.npz`` (``samples``, ``labels``) and ``samples_nfe{K}.png`` to DIR
(default: the checkpoint's folder). ``--steps`` overrides the sampler's number of steps;
``--teacher`` samples the teacher with EDM's Heun sampler (``--steps`` Heun steps) instead.
``--precision bf16`` runs the networks in bfloat16 (EDM networks wholly, see
``gdistill.networks.edm.sampling_precision``); the samples are float32 either way.
"""
import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmengine.config import DictAction  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402

from gdistill.engine.runner import load_trained_model  # noqa: E402
from gdistill.engine.visual import save_samples_figure  # noqa: E402
from gdistill.networks.edm.precond import PRECISIONS, in_precision  # noqa: E402
from gdistill.registry import SAMPLERS, build  # noqa: E402
from gdistill.samplers.decoded import with_decoder  # noqa: E402
from gdistill.samplers.multistep import config_with_steps  # noqa: E402
from train import load_config  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('config')
    p.add_argument('checkpoint')
    p.add_argument('--steps', type=int, help='sampling steps (NFE for the student)')
    p.add_argument('--num', type=int, default=4096)
    p.add_argument('--batch', type=int, default=4096)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out')
    p.add_argument('--teacher', action='store_true', help="sample the teacher with its paper's sampler (EDM's Heun, 18 steps; EDM2's, 32)")
    p.add_argument('--no-ema', action='store_true', help='use the raw generator, not its EMA')
    p.add_argument('--precision', choices=PRECISIONS, default='fp32', help='network precision while sampling')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, default={})
    args = p.parse_args(argv)
    cfg = load_config(args.config, cfg_options=args.cfg_options)
    DefaultScope.get_instance('gdistill_sample', scope_name='gdistill')
    model = load_trained_model(cfg.model, args.checkpoint, args.config)

    if args.teacher:
        sampler = build(SAMPLERS, model.teacher.reference_sampler(args.steps))
        net = model.teacher
    else:
        sampler = build(SAMPLERS, config_with_steps(cfg.model.sampler, args.steps))
        net = model.sampling_network(use_ema=not args.no_ema)
    # a latent model's samples are decoded to pixels by the config's `decoder` (e.g. StabilityVAE)
    sampler = with_decoder(sampler, cfg.get('decoder'), model)

    g = torch.Generator().manual_seed(args.seed)
    k = model.teacher.label_dim
    chunks, labels = [], []
    for start in range(0, args.num, args.batch):
        n = min(args.batch, args.num - start)
        noise = torch.randn((n,) + model.data_shape, generator=g)
        lab = None
        if k:
            lab = torch.nn.functional.one_hot(torch.arange(start, start + n) % k, k).float()
            labels.append(lab.argmax(1))
        with torch.no_grad():
            chunks.append(sampler(in_precision(net, args.precision, noise.device), noise, lab, generator=g))
    x = torch.cat(chunks)
    out = args.out or osp.dirname(osp.abspath(args.checkpoint))
    os.makedirs(out, exist_ok=True)
    stem = osp.join(out, f'samples_{"teacher_" if args.teacher else ""}nfe{sampler.nfe}')
    np.savez(stem + '.npz', samples=x.numpy(), labels=torch.cat(labels).numpy() if labels else np.zeros(0))
    save_samples_figure(x, stem + '.png', title=f'{"teacher" if args.teacher else "student"} · NFE {sampler.nfe}')
    print(f'wrote {stem}.npz and {stem}.png ({len(x)} samples, NFE {sampler.nfe})')


if __name__ == '__main__':
    from gdistill.engine.cli import run  # one line and exit 2 for a user error; --debug: traceback
    run(main)
