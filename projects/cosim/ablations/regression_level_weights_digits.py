# DMD's regression term on the 8x8 digits with the call at σ = 20 left out (level_weights: λ's
# multiplier per level of 80, 70, 20, 0.4), three seeds, 1 000 iterations, the generator at 3e-4,
# β₁ = 0.9: the setting projects/cosim/digits.py trains. Seed 0 also ran with the weight 0.1 at
# σ = 20 (--cfg-options model.regression.level_weights=[1,1,0.1,1]).
#   python tools/ablate.py projects/cosim/ablations/regression_level_weights_digits.py --jobs 3 --threads 1
# Needs the digits teacher and the FD-digits detector (docs/digits.md, "Commands").
# Results: docs/digits.md ("The call at σ = 20").
import os.path as osp
import runpy

_scan = runpy.run_path(osp.join(osp.dirname(osp.abspath(__file__)), 'regression_lr_digits.py'))
base, rows, metrics = (_scan[k] for k in ('base', 'rows', 'metrics'))
cfg_options = {k: v for k, v in _scan['cfg_options'].items() if k != 'model.regression.level_weights'}
cfg_options['optim_wrapper.generator.optimizer.lr'] = 3e-4
axes = {'model.regression.level_weights': [[1.0, 1.0, 0.0, 1.0]]}
seeds = [0, 1, 2]
work_dir = 'work_dirs/ablations/cosim_regression_level_weights_digits'
