# DMD's regression term at the sampler's levels on the 8x8 digits over three seeds
# (regression_digits.py found the levels better than the one-step map only, and λ = 10 better than
# 1, on seed 0): λ = 10 and 30, 1 000 iterations, pool of 10 000 Heun-35 pairs.
#   python tools/ablate.py projects/cosim/ablations/regression_digits_seeds.py --jobs 5 --threads 1
# The 1 500-iteration figures (digits.py's length) came from resuming the λ = 10 runs:
#   python tools/train.py W/digits_data.py --work-dir W --resume --cfg-options train_cfg.max_iters=1500
# with W = work_dirs/ablations/cosim_regression_digits_seeds/weight10.0_seed<S>.
# Needs the digits teacher and the FD-digits detector (docs/digits.md, "Commands").
# Results: docs/digits.md ("DMD's regression term").
base = 'projects/cosim/digits_data.py'
axes = {'model.regression.weight': [10.0, 30.0]}
seeds = [0, 1, 2]
cfg_options = {'model.mixing': 'model', 'model.regression.num_pairs': 10000, 'train_cfg.max_iters': 1000,
               'model.regression.levels': [80.0, 70.0, 20.0, 0.4],
               'model.regression.cache_dir': 'work_dirs/pairs',
               'model.regression.level_weights': None,  # every level (digits.py now leaves out σ = 20)
               # the generator rate of that time (digits.py now steps at 3e-4, β₁ = 0.9)
               'optim_wrapper.generator.optimizer.lr': 5e-5, 'optim_wrapper.generator.optimizer.betas': (0.0, 0.999)}
work_dir = 'work_dirs/ablations/cosim_regression_digits_seeds'
rows = ['CoSIM']
metrics = ['fd_digits', 'pr_precision', 'pr_recall', 'label_accuracy']
plot_x = 'model.regression.weight'
