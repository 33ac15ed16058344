# CoSIM's π(t | s) on a mixture with unequal weights: one window of 1/R of the ramp
# (window='fixed', gdistill's default) against App. A.1's mixture of windows 1, 1/2, ..., 1/R with
# B ~ Bernoulli(1/2) (window='paper'), three seeds each, on wring8, with the model's own mixing
# samples; the same budget and checkpoints as mixing_toy.py, so the two grids compare row by row.
#   python tools/ablate.py projects/cosim/ablations/window_toy.py --jobs 2
#   python docs/figures/cosim_weights.py work_dirs/ablations/cosim_window_toy/*seed* --out w.json
# Results: docs/ablations.md ("CoSIM: π(t | s)").
import os.path as _osp
import runpy as _runpy

base = 'projects/cosim/toy2d.py'
axes = {'model.time_sampler.window': ['fixed', 'paper']}
seeds = [0, 1, 2]
# wring8, 1 000 iterations, checkpoints every 500: mixing_toy.py's settings
cfg_options = _runpy.run_path(_osp.join(_osp.dirname(__file__), 'mixing_toy.py'))['cfg_options']
work_dir = 'work_dirs/ablations/cosim_window_toy'
rows = ['CoSIM']
metrics = ['mmd', 'near_mode', 'mode_tv', 'near_mode_tv']
plot_x = 'model.time_sampler.window'
