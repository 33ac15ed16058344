# DMD's regression term on the 8x8 digits (not in CoSIM): the generator's φ-update gets
# λ·½‖G(x; σ) − y‖² on a pool of 10 000 pairs of the teacher's Heun-35 samples y from the same
# latents, either on the one-step map only (DMD: levels None, G(80·z) → y) or at each of the
# sampler's levels 80, 70, 20, 0.4 (the input below 80 is the teacher's ODE trajectory there).
# Seed 0 for the scan; the chosen setting over three seeds is regression_digits_seeds.py.
#   python tools/ablate.py projects/cosim/ablations/regression_digits.py --jobs 2
# Needs the digits teacher and the FD-digits detector (docs/digits.md, "Commands").
# Results: docs/digits.md ("DMD's regression term").
base = 'projects/cosim/digits_data.py'
axes = {'model.regression.levels': [None, [80.0, 70.0, 20.0, 0.4]], 'model.regression.weight': [1.0, 10.0]}
seeds = [0]
cfg_options = {'model.mixing': 'model', 'model.regression.num_pairs': 10000, 'train_cfg.max_iters': 1000,
               'model.regression.cache_dir': 'work_dirs/pairs',
               'model.regression.level_weights': None,  # every level (digits.py now leaves out σ = 20)
               # the generator rate of that time (digits.py now steps at 3e-4, β₁ = 0.9)
               'optim_wrapper.generator.optimizer.lr': 5e-5, 'optim_wrapper.generator.optimizer.betas': (0.0, 0.999)}
work_dir = 'work_dirs/ablations/cosim_regression_digits'
rows = ['CoSIM']
metrics = ['fd_digits', 'pr_precision', 'pr_recall', 'label_accuracy']
plot_x = 'model.regression.weight'
