"""Image metrics after training: reference statistics, a model's samples, or real images.

    # reference statistics of a dataset under a detector (EDM's .npz: mu, sigma [+ features])
    python tools/eval.py ref --dataset digits:train --detector network:work_dirs/fd_digits/classifier.pth \
        --out work_dirs/fd_digits/ref_train.npz [--save-features]

    # the metrics of a trained model's samples (the config's `image_metrics`)
    python tools/eval.py gen CONFIG CHECKPOINT [--steps K] [--teacher] [--sampler "dict(...)"] \
        [--num-samples N] [--batch B] [--seed S] [--out rows.json] [--cfg-options k=v ...]

    # the same metrics of real images (the real-vs-real floor)
    python tools/eval.py data CONFIG --dataset digits:held_out [--out rows.json]

    # metric vs NFE from the rows written by gen/data --out
    python tools/eval.py plot rows/*.json --out plot.png [--metrics fd_digits,label_accuracy]

    # any of them on several processes: each draws/reads its share, the statistics are reduced
    torchrun --nproc_per_node=2 tools/eval.py gen CONFIG CHECKPOINT --launcher pytorch

Datasets: ``digits:train|held_out|all`` (scikit-learn's digits, ``DigitsDataset``), a folder or
.zip in EDM's layout (``EDMImageDataset``), or a DATASETS config as a Python dict literal.
Detectors: ``inception:PATH`` (TorchScript), ``dinov2:PATH`` (DINOv2 weights),
``network:CHECKPOINT`` (a registered network's checkpoint, e.g. the digit classifier), or a
DETECTORS config as a dict literal.

``gen`` samples the checkpoint's student with the config's sampler (``--steps`` sets its number
of steps); ``--teacher`` samples the teacher with EDM's Heun sampler (``--steps`` Heun steps,
NFE 2·steps − 1); ``--sampler`` gives any SAMPLERS config. Sample i has its own latent seed and
class i mod K, so the figures do not depend on the number of processes (see
``gdistill.engine.image_eval``). The row printed (and written to ``--out``) holds the metrics,
NFE, sample count, and wall and CPU seconds.
"""
import argparse
import ast
import datetime
import json
import os
import os.path as osp
import sys
import time

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmengine.config import DictAction  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402

import gdistill.data  # noqa: E402,F401  (registers everything a config may name)
import gdistill.distillers  # noqa: E402,F401
import gdistill.engine  # noqa: E402,F401
import gdistill.metrics  # noqa: E402,F401
import gdistill.networks  # noqa: E402,F401
from gdistill.engine.image_eval import denoiser_for, evaluate_images, evaluate_sampler, shard_batches  # noqa: E402
from gdistill.engine.runner import dist_timeout, load_trained_model  # noqa: E402
from gdistill.metrics.frechet import FeatureStats, save_reference  # noqa: E402
from gdistill.metrics.image import ImageEvaluator  # noqa: E402
from gdistill.networks.edm.precond import PRECISIONS, in_precision  # noqa: E402
from gdistill.registry import DATASETS, DETECTORS, SAMPLERS, build  # noqa: E402
from gdistill.samplers.decoded import with_decoder  # noqa: E402
from gdistill.samplers.multistep import config_with_steps  # noqa: E402
from train import load_config  # noqa: E402

DETECTOR_KINDS = {'inception': ('InceptionDetector', 'path'), 'dinov2': ('DINOv2Detector', 'path'),
                  'network': ('NetworkDetector', 'checkpoint')}


def _literal_node(node):
    """A literal, or ``dict(key=literal, ...)`` (the configs' spelling), from an AST node; no
    other call is evaluated."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == 'dict' and not node.args:
        return {k.arg: _literal_node(k.value) for k in node.keywords}
    if isinstance(node, ast.Dict):
        return {_literal_node(k): _literal_node(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_literal_node(v) for v in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    return ast.literal_eval(node)


def _literal(text, what):
    try:
        value = _literal_node(ast.parse(text, mode='eval').body)
    except (ValueError, SyntaxError, TypeError):
        value = None
    if not isinstance(value, dict) or 'type' not in value:
        raise ValueError(f'{what} {text!r}: expected KIND:PATH or a config such as '
                         '"dict(type=..., ...)" or "{\'type\': ..., ...}"')
    return value


def dataset_config(spec):
    if spec.startswith('digits:'):
        return dict(type='DigitsDataset', split=spec.split(':', 1)[1])
    if osp.exists(spec):
        return dict(type='EDMImageDataset', path=spec)
    return _literal(spec, '--dataset')


def detector_config(spec):
    kind, _, path = spec.partition(':')
    if kind in DETECTOR_KINDS and path:
        type_, key = DETECTOR_KINDS[kind]
        return {'type': type_, key: path}
    return _literal(spec, '--detector')


def init_distributed(launcher, timeout=None):
    """The process group, with the training runs' timeout (``dist_timeout``: gloo 300 s unless
    given; NCCL's own default on GPUs), so a hung peer ends the evaluation instead of blocking it."""
    if launcher == 'none':
        return 0, 1
    dist = torch.distributed
    if not dist.is_initialized():
        seconds = dist_timeout({'dist_timeout': timeout})
        dist.init_process_group(backend='nccl' if torch.cuda.is_available() else 'gloo',
                                **({'timeout': datetime.timedelta(seconds=seconds)} if seconds else {}))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', 0)))
    return dist.get_rank(), dist.get_world_size()


def device():
    return torch.device('cuda', torch.cuda.current_device()) if torch.cuda.is_available() else torch.device('cpu')


def metrics_of(cfg):
    """The config's image metrics: its ``image_metrics`` list, else those of its ImageMetricHook."""
    if cfg.get('image_metrics'):
        return list(cfg.image_metrics)
    for hook in cfg.get('custom_hooks', []):
        if hook.get('type') == 'ImageMetricHook':
            return list(hook['metrics'])
    raise ValueError('the config defines no image metrics: give it `image_metrics = [...]` or an ImageMetricHook')


def cmd_ref(args, rank, world):
    dataset = build(DATASETS, dataset_config(args.dataset))
    det = build(DETECTORS, detector_config(args.detector)).to(device())
    n = len(dataset) if args.max_items is None else min(len(dataset), args.max_items)
    stats, feats, index = None, [], []
    with torch.no_grad():
        for idx in shard_batches(n, args.batch, rank, world):
            images = torch.stack([dataset[i]['img'] for i in idx]).to(device())
            f = det(images)
            stats = stats or FeatureStats(f.shape[1])
            stats.update(f)
            if args.save_features:
                feats.append(f.cpu())
                index.append(torch.tensor(idx))
    if stats is None:  # a rank with no share still needs the dimension to reduce
        stats = FeatureStats(det.feature_dim)
    stats.all_reduce()
    extra = dict(n=stats.n)
    if args.save_features:
        parts = [(torch.cat(index), torch.cat(feats))] if feats else [(torch.zeros(0, dtype=torch.long),
                                                                         torch.zeros(0, stats.dim))]
        if world > 1:
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, parts[0])
            parts = gathered
        idx = torch.cat([p[0] for p in parts])
        extra['features'] = torch.cat([p[1] for p in parts])[idx.argsort()].numpy().astype(np.float32)
    if rank == 0:
        save_reference(args.out, stats.mean, stats.cov, **extra)
    return dict(out=args.out, dataset=args.dataset, detector=args.detector, n=stats.n, dim=stats.dim)


def cmd_gen(args, rank, world):
    cfg = load_config(args.config, cfg_options=args.cfg_options)
    DefaultScope.get_instance(f'gdistill_eval_{time.time_ns()}', scope_name='gdistill')
    model = load_trained_model(cfg.model, args.checkpoint, args.config).to(device())
    if args.sampler:
        sampler_cfg, source = _literal(args.sampler, '--sampler'), 'teacher' if args.teacher else 'student'
    elif args.teacher:
        sampler_cfg, source = model.teacher.reference_sampler(args.steps), 'teacher'
    else:
        sampler_cfg, source = config_with_steps(cfg.model.sampler, args.steps), 'student'
    # a latent model's samples are measured as pixels, decoded by the config's `decoder`
    sampler = with_decoder(build(SAMPLERS, sampler_cfg), cfg.get('decoder'), model)
    if model.teacher is model:  # a DenoisingTrainer: its network is the teacher
        source = 'teacher'
    if args.no_ema:
        if args.teacher:
            raise ValueError("--no-ema chooses the student's raw generator (a trainer's raw network); "
                             'a distiller\'s teacher has no EMA: drop --teacher or --no-ema')
        source = 'student_raw'
    evaluator = ImageEvaluator(metrics_of(cfg), device=device())
    net = denoiser_for(model, source)
    net = in_precision(net, args.precision, device())     # the network calls only, not the detector
    results, kept = evaluate_sampler(net, sampler, evaluator, args.num_samples, args.batch, model.data_shape,
                                     model.teacher.label_dim, args.seed, device(), keep=args.keep)
    if rank == 0 and args.samples_out and kept is not None:
        np.savez(args.samples_out, samples=kept.numpy(),
                 labels=(np.arange(len(kept)) % max(model.teacher.label_dim, 1)))
    return dict(name=args.name or f'{source} {type(sampler).__name__}', source=source,
                sampler=type(sampler).__name__, nfe=sampler.nfe, num_samples=args.num_samples, **results)


def cmd_data(args, rank, world):
    cfg = load_config(args.config, cfg_options=args.cfg_options)
    dataset = build(DATASETS, dataset_config(args.dataset))
    evaluator = ImageEvaluator(metrics_of(cfg), device=device())
    results = evaluate_images(dataset, evaluator, args.batch, args.max_items)
    return dict(name=args.name or f'real {args.dataset}', nfe=0, num_samples=len(dataset)
                if args.max_items is None else min(len(dataset), args.max_items), **results)


def cmd_plot(args, rank, world):
    """Metric against NFE from result rows (the JSON files ``gen``/``data`` wrote): one line per
    sampler family (rows with equal name), real-data rows (NFE 0) as horizontal floors."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = []
    for path in args.rows:
        with open(path) as f:
            rows.append(json.load(f))
    keys = args.metrics.split(',')
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        families = {}
        for r in rows:
            if key in r:
                families.setdefault(r['name'], []).append((r['nfe'], r[key]))
        for name, pts in families.items():
            pts.sort()
            if pts[0][0] == 0:
                if args.floor_on and key not in args.floor_on.split(','):
                    continue  # e.g. a floor measured on fewer samples than the rows of this panel
                ax.axhline(pts[0][1], color='gray', ls='--', lw=1, label=name)
            else:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], 'o-', label=name)
        ax.set_xscale('log', base=2)
        if key.startswith('fd'):
            ax.set_yscale('log')  # a failed few-step sampler sits orders of magnitude higher
        ax.set_xlabel('NFE')
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=120)
    return dict(out=args.out, rows=len(rows))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--batch', type=int, default=500, help='samples per batch (also the seeding block)')
    common.add_argument('--out', help='write the result here (.npz for ref, .json otherwise)')
    common.add_argument('--launcher', choices=['none', 'pytorch'], default='none')
    common.add_argument('--dist-timeout', type=float, default=None,
                        help='seconds a collective waits for a peer (default: 300 on CPUs, NCCL\'s on GPUs)')
    common.add_argument('--threads', type=int, help='torch CPU threads')
    common.add_argument('--local-rank', '--local_rank', type=int, default=0)

    r = sub.add_parser('ref', parents=[common], help='reference statistics of a dataset')
    r.add_argument('--dataset', required=True)
    r.add_argument('--detector', required=True)
    r.add_argument('--max-items', type=int)
    r.add_argument('--save-features', action='store_true', help='also store the features (for precision/recall)')

    g = sub.add_parser('gen', parents=[common], help="metrics of a trained model's samples")
    g.add_argument('config')
    g.add_argument('checkpoint')
    g.add_argument('--steps', type=int)
    g.add_argument('--teacher', action='store_true')
    g.add_argument('--no-ema', action='store_true', help="the student's raw generator, not its EMA")
    g.add_argument('--sampler', help='a SAMPLERS config as a dict literal')
    g.add_argument('--num-samples', type=int, default=4500, help='(not --num: torchrun would take that for its own option)')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--precision', choices=PRECISIONS, default='fp32',
                   help='network precision while sampling (bf16: EDM networks wholly in bfloat16)')
    g.add_argument('--name')
    g.add_argument('--keep', type=int, default=100, help='samples kept for --samples-out')
    g.add_argument('--samples-out', help='.npz of the first --keep samples and their labels')
    g.add_argument('--cfg-options', nargs='+', action=DictAction, default={})

    d = sub.add_parser('data', parents=[common], help='metrics of real images (the floor)')
    d.add_argument('config')
    d.add_argument('--dataset', required=True)
    d.add_argument('--max-items', type=int)
    d.add_argument('--name')
    d.add_argument('--cfg-options', nargs='+', action=DictAction, default={})
    pl = sub.add_parser('plot', parents=[common], help='metric vs NFE from result JSON files')
    pl.add_argument('rows', nargs='+', help='JSON files written by gen/data --out')
    pl.add_argument('--metrics', default='fd_digits,label_accuracy', help='comma-separated result keys')
    pl.add_argument('--floor-on', help='comma-separated keys whose panels show the real-data rows (default: all)')
    args = p.parse_args(argv)
    if args.command in ('ref', 'plot') and not args.out:
        p.error(f'{args.command} needs --out FILE')
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world = init_distributed(args.launcher, args.dist_timeout)
    start, cpu0 = time.perf_counter(), time.process_time()
    result = dict(ref=cmd_ref, gen=cmd_gen, data=cmd_data, plot=cmd_plot)[args.command](args, rank, world)
    result.update(seconds=round(time.perf_counter() - start, 2), cpu_seconds=round(time.process_time() - cpu0, 2),
                  processes=world)
    if rank == 0:
        print(json.dumps(result))
        if args.out and args.command in ('gen', 'data'):
            os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
            with open(args.out, 'w') as f:
                json.dump(result, f, indent=1)
    return result


if __name__ == '__main__':
    from gdistill.engine.cli import run  # one line and exit 2 for a user error; --debug: traceback
    run(main)
