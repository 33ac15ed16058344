"""The latent toy, end to end on the CPU: EDM2's ImageNet-512 pipeline in miniature.

    python tools/latent_toy.py [--work-dir work_dirs/latent_toy] [--vae-iters N] [--teacher-iters N]
        [--iters N] [--batch B] [--num-samples N] [--seed S]

1. a tiny VAE (diffusers AutoencoderKL, 1 -> 4 channels, 8x8 -> 4x4), randomly initialised and,
   with ``--vae-iters``, fitted to the digits (reconstruction + a small KL term), saved as a
   diffusers folder ``WORK/vae``;
2. the 8x8 digits (scikit-learn's, training split) encoded into EDM2's latent layout,
   ``WORK/digits-latents.zip`` (posterior mean and std per image), and the per-channel mean and
   std of their posterior draws measured (EDM2's raw_mean/raw_std whitening, to std 0.5);
3. a tiny EDM2 teacher trained on the latents by ``DenoisingTrainer``
   (``configs/teachers/edm2_latent_toy.py``; a fresh posterior draw per step), in ``WORK/teacher``;
4. CoSIM distillation with the ImageNet-512 config family (``projects/cosim/latent_toy.py``,
   based on ``imagenet512_s.py``), in ``WORK/cosim``;
5. decoded samples of the student (NFE 1, 2, 4) and of the teacher (EDM2's sampler), as pixels:
   ``WORK/samples_*.png`` and ``.npz`` (uint8 images), and ``WORK/summary.json``.
"""
import argparse
import json
import os
import os.path as osp
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, osp.join(ROOT, 'tools'))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402

import gdistill.data  # noqa: E402,F401
import gdistill.distillers  # noqa: E402,F401
import gdistill.engine  # noqa: E402,F401
import gdistill.networks  # noqa: E402,F401
import gdistill.samplers  # noqa: E402,F401
from gdistill.data.digits import DigitsDataset  # noqa: E402
from gdistill.data.latents import EDM2LatentDataset, encode_image_dataset, latent_statistics  # noqa: E402
from gdistill.engine.runner import build_runner  # noqa: E402
from gdistill.engine.visual import image_grid  # noqa: E402
from gdistill.networks.vae import StabilityVAE, clear_vae_cache  # noqa: E402
from gdistill.samplers.decoded import DecodedSampler, check_whitening  # noqa: E402
from gdistill.registry import SAMPLERS, build  # noqa: E402
from train import load_config  # noqa: E402

TEACHER_CONFIG = osp.join(ROOT, 'configs', 'teachers', 'edm2_latent_toy.py')
COSIM_CONFIG = osp.join(ROOT, 'projects', 'cosim', 'latent_toy.py')
#: the toy VAE: 8x8 grey digits <-> 4x4x4 latents (one downsampling), 15 k parameters
TOY_VAE = dict(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=[16, 32], layers_per_block=1,
               norm_num_groups=8, down_block_types=['DownEncoderBlock2D'] * 2,
               up_block_types=['UpDecoderBlock2D'] * 2, sample_size=8)


def fit_vae(vae, images, iters, batch=128, lr=2e-3, kl_weight=1e-3, seed=0):
    """Fits the diffusers AutoencoderKL ``vae`` to uint8 ``images`` in EDM2's pixel range [0, 1]:
    squared error of the decoded posterior draw plus ``kl_weight``·KL(posterior ‖ N(0, I)), both
    per pixel. Returns the last loss."""
    g = torch.Generator().manual_seed(seed)
    x_all = images.float() / 255
    vae.train().requires_grad_(True)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    loss = torch.tensor(float('nan'))
    for _ in range(iters):
        x = x_all[torch.randint(len(x_all), (batch,), generator=g)]
        post = vae.encode(x)['latent_dist']
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z)['sample']
        loss = (rec - x).pow(2).mean() + kl_weight * post.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vae.eval().requires_grad_(False)
    return float(loss.detach())


def run(config, work_dir, options):
    cfg = load_config(config, work_dir=work_dir, cfg_options=options)
    cfg.experiment_name = f'{osp.basename(work_dir)}_{time.time_ns()}'
    runner = build_runner(cfg)
    runner.train()
    return runner


def scalars(runner, *names):
    hub = runner.message_hub
    return {n: float(hub.get_scalar(f'train/{n}').current()) for n in names}


@torch.no_grad()
def decoded_samples(model, sampler, decoder, num, label_dim, seed, source):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((num,) + tuple(model.data_shape), generator=g)
    labels = torch.nn.functional.one_hot(torch.arange(num) % label_dim, label_dim).float()
    dec = DecodedSampler(sampler, decoder)
    if source == 'teacher':
        x = dec(model.teacher, noise, labels, generator=g)
    else:
        x = model.sample(noise, labels, sampler=dec, generator=g)
    return x, dec


def write_samples(model, vae, work, num, seed=0):
    """Decoded samples of the student (NFE 4, 2, 1) and the teacher (EDM2's sampler, 16 steps):
    ``samples_<source>_<tag>.npz`` (uint8 images, labels) and one picture ``samples.png`` of four
    grids (sample i has class i mod 10). Returns {name: dict(nfe, shape, dtype)}."""
    check_whitening(vae, model)
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    k = model.teacher.label_dim
    rows = [('student', f'nfe{n}', dict(type='MultistepSampler', num_steps=n)) for n in (4, 2, 1)]
    rows.append(('teacher', 'edm2', dict(type='EDM2Sampler', num_steps=16)))
    out, panels = {}, []
    for source, tag, spec in rows:
        x, dec = decoded_samples(model, build(SAMPLERS, spec), vae, num, k, seed, source)
        name = f'samples_{source}_{tag}'
        pixels = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        np.savez(osp.join(work, name + '.npz'), images=pixels.numpy(), labels=np.arange(len(x)) % k)
        grid = image_grid(x, nrow=int(np.ceil(np.sqrt(len(x)))))
        panels.append(np.kron(grid, np.ones((4, 4, 1), dtype=np.uint8)))
        out[name] = dict(nfe=dec.nfe, shape=list(pixels.shape), dtype=str(pixels.dtype))
    gap = np.full((panels[0].shape[0], 8, 3), 255, dtype=np.uint8)
    plt.imsave(osp.join(work, 'samples.png'), np.concatenate(sum(([q, gap] for q in panels), [])[:-1], axis=1))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--work-dir', default=osp.join('work_dirs', 'latent_toy'))
    p.add_argument('--vae-iters', type=int, default=0, help='fit the toy VAE for this many steps (0: random)')
    p.add_argument('--teacher-iters', type=int, default=2000)
    p.add_argument('--iters', type=int, default=1000, help='CoSIM iterations')
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--num-samples', type=int, default=100)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    DefaultScope.get_instance(f'latent_toy_{time.time_ns()}', scope_name='gdistill')
    work = osp.abspath(args.work_dir)
    os.makedirs(work, exist_ok=True)
    summary = dict(work_dir=work)
    start = time.perf_counter()

    # 1. the VAE
    digits = DigitsDataset('train')
    vae = StabilityVAE(config=TOY_VAE, seed=args.seed)
    if args.vae_iters:
        summary['vae_loss'] = fit_vae(vae.vae, digits.images, args.vae_iters, seed=args.seed)
    vae_dir = osp.join(work, 'vae')
    vae.vae.save_pretrained(vae_dir)
    clear_vae_cache()
    vae = StabilityVAE(path=vae_dir)

    # 2. the latent dataset and its whitening
    data = osp.join(work, 'digits-latents.zip')
    if osp.exists(data):
        os.remove(data)
    encode_image_dataset(digits, vae, data, batch_size=256)
    raw_mean, raw_std = latent_statistics(EDM2LatentDataset(data))
    summary.update(num_latents=len(digits), raw_mean=raw_mean, raw_std=raw_std)
    # the data is whitened, and decoded, with these constants (preprocessor, decoder, picture hook)
    whitening = {'model.data_preprocessor.raw_mean': raw_mean, 'model.data_preprocessor.raw_std': raw_std,
                 'decoder.path': vae_dir, 'decoder.raw_mean': raw_mean, 'decoder.raw_std': raw_std,
                 'train_dataloader.dataset.path': data, 'train_dataloader.batch_size': args.batch,
                 'randomness.seed': args.seed, 'torch_threads': args.threads}
    vae = StabilityVAE(path=vae_dir, raw_mean=raw_mean, raw_std=raw_std)

    # 3. the teacher
    warm = max(1, min(100, args.teacher_iters // 5))
    teacher = run(TEACHER_CONFIG, osp.join(work, 'teacher'), dict(whitening, **{
        'train_cfg.max_iters': args.teacher_iters, 'param_scheduler.0.end': warm, 'param_scheduler.1.begin': warm,
        'param_scheduler.1.end': args.teacher_iters, 'default_hooks.checkpoint.interval': args.teacher_iters,
        'default_hooks.logger.interval': max(1, min(100, args.teacher_iters // 4))}))
    summary['teacher'] = scalars(teacher, 'loss_denoise')
    teacher_ckpt = osp.join(work, 'teacher', f'iter_{args.teacher_iters}.pth')

    # 4. CoSIM
    cosim = run(COSIM_CONFIG, osp.join(work, 'cosim'), dict(whitening, **{
        'model.teacher.checkpoint': teacher_ckpt, 'train_cfg.max_iters': args.iters,
        'custom_hooks.2.decoder.path': vae_dir, 'custom_hooks.2.decoder.raw_mean': raw_mean,
        'custom_hooks.2.decoder.raw_std': raw_std, 'custom_hooks.2.interval': args.iters,
        'custom_hooks.2.num_samples': args.num_samples, 'default_hooks.checkpoint.interval': args.iters,
        'default_hooks.logger.interval': max(1, min(100, args.iters // 4))}))
    summary['cosim'] = scalars(cosim, 'loss_aux', 'loss_generator')

    # 5. decoded samples
    model = getattr(cosim.model, 'module', cosim.model).eval()
    summary['samples'] = write_samples(model, vae, work, args.num_samples, args.seed)
    summary['seconds'] = round(time.perf_counter() - start, 1)
    with open(osp.join(work, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary))
    return summary


if __name__ == '__main__':
    main()
