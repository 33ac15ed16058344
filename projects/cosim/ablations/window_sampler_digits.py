# Training the chain's own jumps on the 8x8 digits: window='sampler' draws the mixing times at the
# sampler's levels (digits.py's 80, 70, 20, 0.4; s on the stretch each jump covers) instead of CoSIM's
# window, over three seeds at 1 000 iterations; both variants sample at those levels (NFE 4) and
# at 80, 0.4 (NFE 2). The chain's mixing samples (model.mixing='chain', which needs
# window='sampler') are one more run: add --cfg-options model.mixing=chain to the 'sampler' variant.
#   python tools/ablate.py projects/cosim/ablations/window_sampler_digits.py --jobs 2
# Needs the digits teacher and the FD-digits detector (docs/digits.md, "Commands").
# Results: docs/digits.md ("The sampler's levels").
base = 'projects/cosim/digits_data.py'
axes = {'model.time_sampler.window': ['fixed', 'sampler']}
seeds = [0, 1, 2]
# measured before digits.py turned DMD's regression term on: it stays off here
# and at the generator rate of that time (digits.py now steps at 3e-4, β₁ = 0.9)
cfg_options = {'model.mixing': 'model', 'model.regression': None, 'train_cfg.max_iters': 1000,
               'optim_wrapper.generator.optimizer.lr': 5e-5, 'optim_wrapper.generator.optimizer.betas': (0.0, 0.999)}
work_dir = 'work_dirs/ablations/cosim_window_sampler_digits'
rows = ['CoSIM']
metrics = ['fd_digits', 'pr_precision', 'pr_recall', 'label_accuracy']
plot_x = 'model.time_sampler.window'
