"""Image-metric evaluation: draws samples with fixed seeds, shares them out over processes, and
measures them with ``ImageEvaluator`` (FD with any detector, precision/recall, label accuracy);
during training through ``ImageMetricHook``, after it through ``tools/eval.py``.

Reproducibility. Sample i starts from the latent drawn by its own generator, seeded with
(seed, i) (EDM's ``generate.py`` likewise seeds every image), and is drawn for class i mod K. Samplers that add noise on the way (CoSIM's multistep sampler, EDM churn) draw it from
one generator per batch, seeded by the batch's first index. Batches are the blocks
[jB, (j+1)B) of indices and process r of W takes blocks j ≡ r (mod W), so a run gives the same
samples — and the same metrics — on any number of processes at a given batch size B (and
deterministic samplers give the same samples at any B).
"""
import json
import os
import os.path as osp
import time

import numpy as np
import torch
from mmengine.dist import is_main_process
from mmengine.hooks import Hook

from ..metrics.detectors import images_to_uint8
from ..metrics.image import ImageEvaluator
from ..registry import HOOKS, SAMPLERS, build
from .visual import image_grid

__all__ = ['batch_seed', 'latents', 'shard_batches', 'evaluate_sampler', 'evaluate_images',
           'denoiser_for', 'ImageMetricHook']


def _rank_world():
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def batch_seed(seed, first_index):
    """The seed of the noise a stochastic sampler draws for the batch starting at ``first_index``:
    32 bits mixed from (seed, first_index) by numpy's SeedSequence (torch's CPU generator keeps
    only the low 32 bits of a seed, so (seed << 32) + i would repeat across seeds)."""
    return int(np.random.SeedSequence([int(seed), 1 << 31, int(first_index)]).generate_state(1)[0])


def latents(indices, shape, seed):
    """Standard-normal latents [len(indices), *shape] (float32), row i from its own generator,
    numpy's PCG64 seeded with the entropy (seed, i): independent streams for every pair."""
    if int(seed) < 0:
        raise ValueError(f'the evaluation seed must be >= 0, got {seed}')
    rows = [np.random.default_rng([int(seed), int(i)]).standard_normal(shape) for i in indices]
    return torch.from_numpy(np.stack(rows)).float()


def shard_batches(num, batch_size, rank=0, world_size=1):
    """Index blocks [jB, (j+1)B) of range(num) that process ``rank`` of ``world_size`` evaluates."""
    if num < 1 or batch_size < 1:
        raise ValueError(f'need num >= 1 and batch_size >= 1, got {num}, {batch_size}')
    starts = range(0, num, batch_size)
    return [list(range(s, min(s + batch_size, num))) for j, s in enumerate(starts) if j % world_size == rank]


def denoiser_for(model, source):
    """The network a sampler runs for an evaluation row: ``'student'`` is the model's (EMA)
    generator — for ``DenoisingTrainer`` its (EMA) network — ``'student_raw'`` the same without
    the EMA, and ``'teacher'`` its frozen teacher (the same network for a trainer, which is its
    own teacher)."""
    model = getattr(model, 'module', model)
    if source == 'teacher' and model.teacher is not model:
        return model.teacher
    if source not in ('student', 'student_raw', 'teacher'):
        raise ValueError(f"an evaluation's source is 'student', 'student_raw' or 'teacher', got {source!r}")
    use_ema = source != 'student_raw'
    if hasattr(model, 'sampling_network'):
        return model.sampling_network(use_ema=use_ema)
    ema = getattr(model, 'network_ema', None) if use_ema else None
    net = ema if ema is not None else model.network
    return getattr(net, 'module', net)


@torch.no_grad()
def evaluate_sampler(denoiser, sampler, evaluator, num_samples, batch_size, data_shape, label_dim,
                     seed=0, device='cpu', keep=0):
    """Draws ``num_samples`` samples with ``sampler`` on ``denoiser`` (this process's share) and
    returns ``(results, kept)``: the evaluator's reduced results and, on the process that drew
    them, the first ``keep`` samples in [−1, 1] (CPU) for pictures."""
    rank, world = _rank_world()
    evaluator.reset(num_samples)
    was_training = getattr(denoiser, 'training', False)
    if hasattr(denoiser, 'eval'):
        denoiser.eval()
    kept = []
    try:
        for idx in shard_batches(num_samples, batch_size, rank, world):
            noise = latents(idx, tuple(data_shape), seed).to(device)
            index = torch.tensor(idx)
            labels = onehot = None
            if label_dim:
                labels = index % label_dim
                onehot = torch.nn.functional.one_hot(labels, label_dim).float().to(device)
            g = torch.Generator(device=device).manual_seed(batch_seed(seed, idx[0]))
            x = sampler(denoiser, noise, onehot, generator=g)
            evaluator.update(images_to_uint8(x), labels, index)
            if idx[0] < keep:
                kept.append(x[:keep - idx[0]].cpu())
    finally:
        if hasattr(denoiser, 'train'):
            denoiser.train(was_training)
    return evaluator.finish(), (torch.cat(kept) if kept else None)


@torch.no_grad()
def evaluate_images(dataset, evaluator, batch_size=500, max_items=None):
    """Measures the images of a dataset (items with uint8 ``img`` and one-hot ``label``) as if
    they were samples: the real-vs-real floor of the metrics. Shared out like ``evaluate_sampler``."""
    rank, world = _rank_world()
    num = len(dataset) if max_items is None else min(len(dataset), int(max_items))
    evaluator.reset(num)
    for idx in shard_batches(num, batch_size, rank, world):
        items = [dataset[i] for i in idx]
        images = torch.stack([it['img'] for it in items])
        if images.dtype != torch.uint8:
            raise ValueError(f'evaluate_images: dataset images must be uint8, got {images.dtype}')
        labels = None
        if items[0].get('label') is not None and items[0]['label'].numel():
            labels = torch.stack([it['label'] for it in items]).argmax(1)
        evaluator.update(images, labels, torch.tensor(idx))
    return evaluator.finish()


def _format_value(v):
    return f'{v:.4g}' if isinstance(v, float) else str(v)


def format_rows(rows):
    keys = [k for k in rows[0] if k not in ('name',)]
    lines = ['| name | ' + ' | '.join(keys) + ' |', '|' + '---|' * (len(keys) + 1)]
    for r in rows:
        lines.append(f"| {r['name']} | " + ' | '.join(_format_value(r.get(k)) for k in keys) + ' |')
    return '\n'.join(lines)


@HOOKS.register_module()
class ImageMetricHook(Hook):
    """Image metrics during and after training.

    ``metrics``: METRICS configs (``FrechetDistance``, ``PrecisionRecall``, ``LabelAccuracy``);
    ``evaluations``: rows ``dict(name=..., source='student'|'student_raw'|'teacher', sampler=SAMPLERS config)``.
    Every ``interval`` iterations the first row is measured on ``interval_samples`` samples and
    its results go to the log and tensorboard (``eval/<key>``); at the end of training every
    row is measured on ``num_samples`` samples, the rows are written to ``metrics.json`` in the
    work dir with the table in the log, and a grid of each row's first ``grid`` samples (fixed
    seeds and labels) is saved as ``samples_final.png`` and sent to tensorboard.
    Every process takes part (each draws its share of the samples); the main one writes."""

    priority = 'LOW'

    def __init__(self, metrics, evaluations, num_samples=4500, batch_size=500, interval=0,
                 interval_samples=1000, seed=0, grid=100):
        if not evaluations:
            raise ValueError('ImageMetricHook: give at least one evaluation row')
        for e in evaluations:
            unknown = set(e) - {'name', 'source', 'sampler'}
            if unknown or 'name' not in e or 'sampler' not in e:
                raise KeyError(f'ImageMetricHook: an evaluation is dict(name=..., source=..., sampler=...); '
                               f'got keys {sorted(e)}')
        self.metric_cfgs, self.evaluations = list(metrics), [dict(e) for e in evaluations]
        self.num_samples, self.batch_size, self.interval = int(num_samples), int(batch_size), int(interval)
        self.interval_samples, self.seed, self.grid = int(interval_samples), int(seed), int(grid)
        self.evaluator, self.history = None, []

    def _model(self, runner):
        return getattr(runner.model, 'module', runner.model)

    def before_train(self, runner):
        model = self._model(runner)
        self.evaluator = ImageEvaluator(self.metric_cfgs, device=model.device_)

    def _run(self, runner, spec, num, keep=0):
        model = self._model(runner)
        sampler = build(SAMPLERS, spec['sampler'])
        net = denoiser_for(model, spec.get('source', 'student'))
        start = time.perf_counter()
        results, kept = evaluate_sampler(net, sampler, self.evaluator, num, self.batch_size, model.data_shape,
                                         model.teacher.label_dim, self.seed, model.device_, keep)
        row = dict(name=spec['name'], nfe=sampler.nfe, num_samples=num, **results,
                   seconds=round(time.perf_counter() - start, 2))
        return row, kept

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if not self.interval or not self.every_n_train_iters(runner, self.interval):
            return
        step = runner.iter + 1
        row, _ = self._run(runner, self.evaluations[0], self.interval_samples)
        scalars = {k: v for k, v in row.items() if isinstance(v, float) and k != 'seconds'}
        self.history.append(dict(iter=step, **scalars))
        if is_main_process():
            runner.visualizer.add_scalars({f'eval/{k}': v for k, v in scalars.items()}, step=step)
            runner.logger.info(f'eval @ {step} ({row["name"]}, NFE {row["nfe"]}, {row["num_samples"]} samples): '
                               + ', '.join(f'{k}={v:.4g}' for k, v in scalars.items()))

    def after_train(self, runner):
        rows, panels = [], []
        for spec in self.evaluations:
            row, kept = self._run(runner, spec, self.num_samples, keep=self.grid)
            rows.append(row)
            if kept is not None:
                grid = image_grid(kept, nrow=int(np.ceil(np.sqrt(len(kept)))))
                zoom = max(1, 256 // grid.shape[0])  # small images (8x8 digits) enlarged, pixels kept sharp
                panels.append(np.kron(grid, np.ones((zoom, zoom, 1), dtype=np.uint8)))
        if not is_main_process():
            return
        path = osp.join(runner.work_dir, 'metrics.json')
        with open(path + '.tmp', 'w') as f:
            json.dump(dict(rows=rows, history=self.history), f, indent=1)
        os.replace(path + '.tmp', path)
        if panels:
            gap = np.full((panels[0].shape[0], 4, 3), 255, dtype=np.uint8)
            picture = np.concatenate(sum(([p, gap] for p in panels), [])[:-1], axis=1)
            import matplotlib.pyplot as plt
            plt.imsave(osp.join(runner.work_dir, 'samples_final.png'), picture)
            runner.visualizer.add_image('final_samples', picture, step=runner.iter)
        for r in rows:
            runner.visualizer.add_scalars({f'final/{r["name"]}_nfe{r["nfe"]}/{k}': v for k, v in r.items()
                                           if isinstance(v, float)}, step=runner.iter)
        runner.logger.info(f'image metrics ({self.num_samples} samples):\n' + format_rows(rows))
