"""Evaluation on toy mixtures: every sampler of a run against the exact distribution."""
import json
import os
import os.path as osp
import time

import torch
from mmengine.dist import is_main_process
from mmengine.hooks import Hook

from ..data.toy_mixtures import make_mixture
from ..metrics.toy import toy_floor, toy_metrics
from ..registry import HOOKS, SAMPLERS, build
from .visual import scatter_image

METRIC_KEYS = ('sw2', 'mmd', 'near_mode', 'mode_tv', 'nll')


def evaluate_samplers(model, mixture, evaluations, num_samples=20000, seed=0):
    """Rows ``{name, sampler, nfe, seconds, sw2, mmd, near_mode, mode_tv, nll}``, one per entry of
    ``evaluations`` and one for the exact floor.

    An entry is ``dict(name=..., source='student'|'teacher', sampler=SAMPLERS config)``; the
    student is the distiller's (EMA) generator, the teacher its frozen denoiser. Each entry
    sees the same latent noise and the same exact reference set."""
    mixture = make_mixture(mixture)
    g = torch.Generator().manual_seed(seed)
    reference = mixture.sample(num_samples, generator=g)
    noise = torch.randn((num_samples, mixture.dim), generator=g)
    rows, pictures = [], []
    for spec in evaluations:
        spec = dict(spec)
        name, source = spec.pop('name'), spec.pop('source', 'student')
        sampler = build(SAMPLERS, spec.pop('sampler'))
        if spec:
            raise KeyError(f'evaluation {name!r}: unknown keys {sorted(spec)}; known: name, source, sampler')
        if source == 'student':
            net = model.sampling_network()
        elif source == 'teacher':
            net = model.teacher
        else:
            raise ValueError(f"evaluation {name!r}: source is 'student' or 'teacher', got {source!r}")
        start = time.perf_counter()
        with torch.no_grad():
            x = sampler(net, noise.to(model.device_), None,
                        generator=torch.Generator(device=model.device_).manual_seed(seed + 1)).cpu()
        seconds = time.perf_counter() - start
        row = dict(name=name, sampler=type(sampler).__name__, nfe=sampler.nfe, seconds=round(seconds, 3))
        row.update(toy_metrics(x, mixture, reference=reference, generator=torch.Generator().manual_seed(seed + 2)))
        rows.append(row)
        pictures.append((f'{name} (NFE {sampler.nfe})', x.numpy()))
    floor = toy_floor(mixture, num_samples, generator=torch.Generator().manual_seed(seed + 3))
    rows.append(dict(name='exact floor', sampler='exact', nfe=0, seconds=0.0, **floor))
    pictures.append(('exact', reference.numpy()))
    return rows, pictures


def format_table(rows):
    head = ['name', 'nfe', 'sw2', 'mmd×1e3', 'near_mode', 'mode_tv', 'nll', 'seconds']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        lines.append(f"| {r['name']} | {r['nfe']} | {r['sw2']:.4f} | {r['mmd'] * 1e3:.3f} | "
                     f"{r['near_mode']:.3f} | {r['mode_tv']:.3f} | {r['nll']:.3f} | {r['seconds']:.2f} |")
    return '\n'.join(lines)


@HOOKS.register_module()
class ToyEvaluationHook(Hook):
    """At the end of training (and every ``interval`` iterations, with ``interval_samples``),
    evaluates ``evaluations`` on ``mixture``; at the end writes ``metrics.json`` (a list of rows),
    prints the table and saves ``samples.png`` in the work dir; scalars go to tensorboard.
    ``mixture=None``: the mixture the teacher models (``teacher.mixture``), so a config that
    swaps the teacher's mixture is evaluated on the new one."""

    priority = 'LOW'

    def __init__(self, evaluations, mixture=None, num_samples=20000, interval=0, interval_samples=4000, seed=0):
        self.mixture = make_mixture(mixture) if mixture is not None else None
        self.evaluations = evaluations
        self.num_samples, self.interval, self.interval_samples, self.seed = \
            num_samples, interval, interval_samples, seed
        self.history = []

    def _model(self, runner):
        return getattr(runner.model, 'module', runner.model)

    def before_train(self, runner):
        if self.mixture is None:
            teacher = self._model(runner).teacher
            if getattr(teacher, 'mixture', None) is None:
                raise ValueError(f'ToyEvaluationHook: no mixture given and the teacher '
                                 f'({type(teacher).__name__}) models none; set the hook\'s `mixture`')
            self.mixture = teacher.mixture

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if not self.interval or not self.every_n_train_iters(runner, self.interval) or not is_main_process():
            return
        step = runner.iter + 1
        rows, _ = evaluate_samplers(self._model(runner), self.mixture, self.evaluations[:1],
                                    self.interval_samples, self.seed)
        r = rows[0]
        self.history.append(dict(iter=step, **{k: r[k] for k in METRIC_KEYS}))
        runner.visualizer.add_scalars({f'eval/{k}': r[k] for k in METRIC_KEYS}, step=step)
        runner.logger.info(f'eval @ {step}: ' + ', '.join(f'{k}={r[k]:.4g}' for k in METRIC_KEYS))

    def after_train(self, runner):
        if not is_main_process():
            return
        model = self._model(runner)
        rows, pictures = evaluate_samplers(model, self.mixture, self.evaluations, self.num_samples, self.seed)
        report = getattr(model.teacher, 'fit_report', None)
        out = dict(rows=rows, teacher_fit=report, history=self.history)
        path = osp.join(runner.work_dir, 'metrics.json')
        with open(path + '.tmp', 'w') as f:
            json.dump(rows, f, indent=1)
        os.replace(path + '.tmp', path)
        with open(osp.join(runner.work_dir, 'eval_details.json'), 'w') as f:
            json.dump(out, f, indent=1)
        lim = float(self.mixture.means.abs().max()) + 1.0
        image = scatter_image(pictures, osp.join(runner.work_dir, 'samples.png'), lim=lim)
        runner.visualizer.add_image('final_samples', image, step=runner.iter)
        for r in rows:
            runner.visualizer.add_scalars({f'final/{r["name"]}/{k}': r[k] for k in METRIC_KEYS}, step=runner.iter)
        runner.logger.info('toy evaluation (' + str(self.num_samples) + ' samples):\n' + format_table(rows))
