"""Train the small digit classifier whose penultimate features are the FD-digits detector,
or measure its label accuracy on generated samples.

    python tools/train_digit_classifier.py [--out work_dirs/fd_digits/classifier.pth] [--epochs 40]
    python tools/train_digit_classifier.py --check SAMPLES.npz [--classifier work_dirs/fd_digits/classifier.pth]

Training reads the 'train' split of ``DigitsDataset`` (the held-out split gives the reported
accuracy) and takes seconds on one CPU core. The checkpoint holds plain tensors and
containers only: ``{'network': MODELS config, 'state_dict': ..., 'meta': {...}}``, so
``NetworkDetector(checkpoint=...)`` reads it with ``weights_only=True``.

``--check``: accuracy of the classifier on the samples of an ``.npz`` from
``tools/sample.py`` (``samples`` in [−1, 1], ``labels`` the classes they were drawn for) —
how often a class-conditional generator draws the digit it was asked for.
"""
import argparse
import json
import os
import os.path as osp
import sys
import time

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gdistill.data.digits import load_digits_split  # noqa: E402
from gdistill.metrics.detectors import NetworkDetector, images_to_uint8  # noqa: E402
from gdistill.registry import MODELS  # noqa: E402

DEFAULT_OUT = osp.join('work_dirs', 'fd_digits', 'classifier.pth')


def to_unit(images_uint8):
    return images_uint8.float() / 127.5 - 1


@torch.no_grad()
def accuracy(net, images_uint8, labels, batch=1024):
    net.eval()
    hits = 0
    for i in range(0, len(labels), batch):
        hits += int((net(to_unit(images_uint8[i:i + batch])).argmax(1) == labels[i:i + batch]).sum())
    return hits / len(labels)


def train(out, epochs=40, batch_size=64, lr=2e-3, weight_decay=1e-4, seed=0, held_out=0.25,
          split_seed=0, network=None):
    """Fit the classifier on the training split (``DigitsDataset``'s split, ``held_out`` and
    ``split_seed``); ``seed`` drives the initialisation and the batches. Returns the checkpoint
    dict (also saved to ``out``)."""
    torch.manual_seed(seed)
    network = dict(network or dict(type='DigitClassifier', in_channels=1, resolution=8, num_classes=10,
                                   width=32, feature_dim=64, dropout=0.1))
    net = MODELS.build(network)
    x_tr, y_tr = load_digits_split('train', held_out, split_seed)
    x_ho, y_ho = load_digits_split('held_out', held_out, split_seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(y_tr) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    start, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(y_tr), generator=g)
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(net(to_unit(x_tr[idx])), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    meta = dict(train_accuracy=accuracy(net, x_tr, y_tr), held_out_accuracy=accuracy(net, x_ho, y_ho),
                epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, held_out=held_out, split_seed=split_seed,
                seconds=round(time.perf_counter() - start, 2), cpu_seconds=round(time.process_time() - cpu0, 2))
    ckpt = dict(network=network, state_dict={k: v.clone() for k, v in net.state_dict().items()}, meta=meta)
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    torch.save(ckpt, out + '.tmp')
    os.replace(out + '.tmp', out)
    return ckpt


def check_samples(classifier, samples_npz):
    """Label accuracy of the samples of ``samples_npz`` (keys ``samples`` in [−1, 1] and
    ``labels``) under the classifier checkpoint."""
    with np.load(samples_npz, allow_pickle=False) as f:
        samples, labels = torch.from_numpy(f['samples']), torch.from_numpy(f['labels']).long()
    if labels.numel() != samples.shape[0]:
        raise ValueError(f'{samples_npz}: {samples.shape[0]} samples but {labels.numel()} labels; '
                         'label accuracy needs the class every sample was drawn for')
    net = NetworkDetector(checkpoint=classifier, method='forward')
    with torch.no_grad():
        pred = net(images_to_uint8(samples)).argmax(1)
    return float((pred == labels).double().mean())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default=DEFAULT_OUT, help='checkpoint to write (default: %(default)s)')
    p.add_argument('--epochs', type=int, default=40)
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--lr', type=float, default=2e-3)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--check', metavar='SAMPLES_NPZ', help='report label accuracy on these samples instead of training')
    p.add_argument('--classifier', default=DEFAULT_OUT, help='checkpoint used by --check')
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.check:
        acc = check_samples(args.classifier, args.check)
        print(json.dumps(dict(samples=args.check, label_accuracy=acc)))
        return acc
    ckpt = train(args.out, args.epochs, args.batch_size, args.lr, seed=args.seed)
    print(json.dumps(dict(out=args.out, **ckpt['meta'])))
    return ckpt


if __name__ == '__main__':
    main()
