# What holds CoSIM back on the 8x8 digits (FD-digits at NFE 4 was 4.2x the teacher's NFE-35
# value): the two choices where gdistill departed from the paper, each over three seeds at 1 000
# iterations (the 2 000-iteration run's FD at NFE 4 was best near 1 000):
#   mixing: the model's one-jump sample (gdistill's earlier default) vs eq. 8's x0 from the data;
#   window: one window of 1/R of the ramp vs App. A.1's mixture of windows 1, 1/2, ..., 1/R.
# The base feeds the data's labels to every variant (model mixing reads no images). The levers
# that need no training (the iteration, the EMA) are read from the checkpoints (every 500).
#   python tools/ablate.py projects/cosim/ablations/levers_digits.py --jobs 2
# Needs the digits teacher and the FD-digits detector (docs/digits.md, "Commands").
# Results: docs/digits.md ("Three seeds and the levers").
base = 'projects/cosim/digits_data.py'
axes = {
    'model.mixing': ['model', 'data'],
    'model.time_sampler.window': ['fixed', 'paper'],
}
seeds = [0, 1, 2]
# measured with the ρ-ramp samplers at σ scale 1 (the default then; digits.py now samples at the
# levels 80, 70, 20, 0.4, and its NFE-2 row at 80, 0.4)
_ramp = {'sigmas': None, 'scale': 1.0}
# measured before digits.py turned DMD's regression term on: it stays off here
# and at the generator rate of that time (digits.py now steps at 3e-4, β₁ = 0.9)
cfg_options = {'train_cfg.max_iters': 1000, 'model.regression': None,
               'optim_wrapper.generator.optimizer.lr': 5e-5, 'optim_wrapper.generator.optimizer.betas': (0.0, 0.999),
               **{f'model.sampler.{k}': v for k, v in _ramp.items()},
               'model.sampler.num_steps': 4,
               **{f'custom_hooks.3.evaluations.{i}.sampler.{k}': v
                  for i in range(3) for k, v in dict(_ramp, num_steps=4 >> i).items()}}
work_dir = 'work_dirs/ablations/cosim_levers_digits'
rows = ['CoSIM']
metrics = ['fd_digits', 'pr_precision', 'pr_recall', 'label_accuracy']
plot_x = 'model.mixing'
