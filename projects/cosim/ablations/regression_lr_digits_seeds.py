# The generator rate regression_lr_digits.py found best (Adam 3e-4, β₁ = 0.9, with DMD's regression
# term λ = 10 at the levels 80, 70, 20, 0.4), over three seeds at 1 000 iterations: digits.py's
# setting until it left the call at σ = 20 out of the term (regression_level_weights_digits.py). Seed 0 is the scan's run (copied into this work dir, or rerun).
#   python tools/ablate.py projects/cosim/ablations/regression_lr_digits_seeds.py --jobs 3 --threads 1
# Needs the digits teacher and the FD-digits detector (docs/digits.md, "Commands").
# Results: docs/digits.md ("DMD's regression term").
import os.path as osp
import runpy

_scan = runpy.run_path(osp.join(osp.dirname(osp.abspath(__file__)), 'regression_lr_digits.py'))
base, cfg_options, rows, metrics, plot_x = (_scan[k] for k in ('base', 'cfg_options', 'rows', 'metrics', 'plot_x'))
axes = {'optim_wrapper.generator.optimizer.lr': [3e-4]}
seeds = [0, 1, 2]
work_dir = 'work_dirs/ablations/cosim_regression_lr_digits_seeds'
