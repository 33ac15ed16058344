# CoSIM's Table 6 on the 8x8 digits: coef = α(1+λ) (α = 1.2) against the training length, from
# the digits teacher (projects/cosim/digits.py; it needs work_dirs/edm_digits/iter_5000.pth and
# the FD-digits detector, see configs/teachers/edm_digits.py) at 500 and 1 000 iterations, with
# the ρ-ramp samplers at σ scale 1 it was measured with (digits.py now samples at its own levels):
# the six runs fit in about half an hour on 2 CPU cores.
#   python tools/ablate.py projects/cosim/ablations/coef_digits.py --jobs 2
# Results: docs/ablations.md.
base = 'projects/cosim/digits.py'
axes = {
    'model.divergence.coef': [0.5, 0.75, 1.0],
    'train_cfg.max_iters': [500, 1000],
}
_ramp = {'sigmas': None, 'scale': 1.0}
# measured before digits.py turned DMD's regression term on: it stays off here
# and at the generator rate of that time (digits.py now steps at 3e-4, β₁ = 0.9)
cfg_options = {'model.regression': None,
               'optim_wrapper.generator.optimizer.lr': 5e-5, 'optim_wrapper.generator.optimizer.betas': (0.0, 0.999),
               **{f'model.sampler.{k}': v for k, v in _ramp.items()}, 'model.sampler.num_steps': 4,
               **{f'custom_hooks.3.evaluations.{i}.sampler.{k}': v
                  for i in range(3) for k, v in dict(_ramp, num_steps=4 >> i).items()}}
work_dir = 'work_dirs/ablations/cosim_coef_digits'
rows = ['CoSIM']
metrics = ['fd_digits', 'pr_precision', 'pr_recall', 'label_accuracy']
plot_x = 'model.divergence.coef'
