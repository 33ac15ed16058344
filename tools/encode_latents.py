"""Encode an image dataset into VAE latents in EDM2's layout (``dataset_tool.py encode``).

    python tools/encode_latents.py --source /data/img512.zip --dest /data/img512-sd.zip \
        --vae checkpoints/sd-vae-ft-mse [--device cuda] [--batch 8] [--max-images N] [--no-labels] [--stats]

``--source``: an EDM/EDM2 image dataset (folder or zip of PNGs with ``dataset.json``; for
ImageNet-512 the 512x512 centre crops of EDM2's ``dataset_tool.py convert
--transform=center-crop-dhariwal``), ``digits:train|held_out|all``, or a DATASETS config as a
dict literal. ``--vae``: the local files of the VAE (a diffusers folder such as
``huggingface-cli download stabilityai/sd-vae-ft-mse --local-dir DIR``; nothing is downloaded).
``--dest``: a ``.zip`` or a new folder, holding ``{i:08d}[:5]/img-mean-std-{i:08d}.npy`` (float32
[8, 64, 64] per 512x512 image: posterior mean and std) and ``dataset.json``, readable by
``EDM2LatentDataset`` and by EDM2's own training code. ``--stats`` also prints the per-channel
mean and std of the posterior draws (EDM2's raw_mean/raw_std, for a VAE other than
sd-vae-ft-mse, whose constants are built in).
"""
import argparse
import json
import os.path as osp
import sys
import time

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

import torch  # noqa: E402

import gdistill.data  # noqa: E402,F401
from gdistill.data.latents import EDM2LatentDataset, encode_image_dataset, latent_statistics  # noqa: E402
from gdistill.networks.vae import StabilityVAE  # noqa: E402
from gdistill.registry import DATASETS, build  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--source', required=True)
    p.add_argument('--dest', required=True)
    p.add_argument('--vae', required=True, help='local VAE files (diffusers folder, HF cache folder or weights file)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--max-images', type=int)
    p.add_argument('--no-labels', action='store_true', help='write "labels": null')
    p.add_argument('--stats', action='store_true', help='print the raw latents\' per-channel mean and std')
    args = p.parse_args(argv)
    from eval import dataset_config  # the dataset specs tools/eval.py takes
    dataset = build(DATASETS, dataset_config(args.source))
    vae = StabilityVAE(path=args.vae, batch_size=args.batch).to(args.device)
    start = time.perf_counter()

    def progress(done, total):
        if done == total or done % (50 * args.batch) < args.batch:
            rate = done / max(time.perf_counter() - start, 1e-9)
            print(f'{done}/{total} images ({rate:.1f}/s)', flush=True)
    n = encode_image_dataset(dataset, vae, args.dest, batch_size=args.batch, max_images=args.max_images,
                             use_labels=not args.no_labels, progress=progress)
    result = dict(dest=args.dest, images=n, seconds=round(time.perf_counter() - start, 1))
    if args.stats:
        result['raw_mean'], result['raw_std'] = latent_statistics(EDM2LatentDataset(args.dest))
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main()
