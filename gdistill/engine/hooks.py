"""Hooks around the training loop: speed and ETA, random-state checkpointing, sample pictures."""
import os
import os.path as osp
import random
import time

import numpy as np
import torch
from mmengine.dist import is_main_process
from mmengine.hooks import Hook

from ..registry import HOOKS
from .visual import save_samples_figure


@HOOKS.register_module()
class SpeedHook(Hook):
    """Puts iterations/s and images/s (over the last ``window`` iterations) into the log, next
    to the ETA that mmengine's logger prints."""

    priority = 'VERY_LOW'

    def __init__(self, window=20):
        self.window = window
        self._times = []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self._times.append(time.perf_counter())
        self._times = self._times[-(self.window + 1):]
        if len(self._times) > 1:
            ips = (len(self._times) - 1) / (self._times[-1] - self._times[0])
            runner.message_hub.update_scalar('train/it_per_s', ips)
            bs = getattr(runner.train_dataloader, 'batch_size', None)
            if bs:
                runner.message_hub.update_scalar('train/img_per_s', ips * bs)


@HOOKS.register_module()
class RandomStateHook(Hook):
    """Saves the random-number states (torch CPU and CUDA, numpy, python) in every checkpoint
    and restores them on resume, so a resumed run draws the same noise as an unbroken one."""

    priority = 'VERY_HIGH'

    def before_save_checkpoint(self, runner, checkpoint):
        state = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate())
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state['cuda'] = torch.cuda.get_rng_state_all()
        checkpoint['rng_state'] = state

    def after_load_checkpoint(self, runner, checkpoint):
        state = checkpoint.get('rng_state')
        if state is None:
            runner.logger.warning('checkpoint has no random state: the resumed run will not '
                                  'repeat the noise of an unbroken one')
            return
        torch.set_rng_state(state['torch'])
        np.random.set_state(state['numpy'])
        random.setstate(state['python'])
        if 'cuda' in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state['cuda'])


@HOOKS.register_module()
class SampleVisualizationHook(Hook):
    """Every ``interval`` iterations (and at the end) draws samples from fixed noise and fixed
    labels with the distiller's sampler, saves a picture under ``work_dir/samples/`` and sends
    it to the visualizer (tensorboard). 2-D data: a scatter plot; images: a grid."""

    priority = 'LOW'

    def __init__(self, interval=1000, num_samples=2048, seed=0):
        self.interval, self.num_samples, self.seed = interval, num_samples, seed

    def _draw(self, runner, step):
        model = getattr(runner.model, 'module', runner.model)
        g = torch.Generator(device=model.device_).manual_seed(self.seed)
        noise = torch.randn((self.num_samples,) + model.data_shape, generator=g, device=model.device_)
        labels = None
        if model.teacher.label_dim:
            idx = torch.arange(self.num_samples, device=model.device_) % model.teacher.label_dim
            labels = torch.nn.functional.one_hot(idx, model.teacher.label_dim).float()
        x = model.sample(noise, labels, generator=g)
        os.makedirs(osp.join(runner.work_dir, 'samples'), exist_ok=True)
        path = osp.join(runner.work_dir, 'samples', f'iter_{step:07d}.png')
        image = save_samples_figure(x.cpu(), path, title=f'{type(model).__name__} · iter {step} · '
                                    f'NFE {model.sampler.nfe}')
        runner.visualizer.add_image('samples', image, step=step)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if self.every_n_train_iters(runner, self.interval) and is_main_process():
            self._draw(runner, runner.iter + 1)
