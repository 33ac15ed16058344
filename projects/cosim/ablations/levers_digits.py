# What holds CoSIM back on the 8x8 digits (issue: FD-digits at NFE 4 is 4.2x the teacher's NFE-35
# value): the levers that need training, each over three seeds, at a shortened length (500
# iterations; the committed run is 2 000 and its FD at NFE 4 was best near 1 000). The levers
# that need no training are evaluated on these runs' checkpoints (every 500 iterations) with
# tools/eval.py gen: the EMA vs the raw generator, the iteration, the sampler's time points.
#   python tools/ablate.py projects/cosim/ablations/levers_digits.py --jobs 2
# Needs the digits teacher and the FD-digits detector (docs/digits.md, "Commands").
# Results: docs/ablations.md.
base = 'projects/cosim/digits.py'
axes = {
    'model.time_sampler.window': ['fixed', 'paper'],     # App. A.1's mixture of windows vs one of 1/R
    'model.time_sampler.R': [2, 4],
}
seeds = [0, 1, 2]
cfg_options = {'train_cfg.max_iters': 500}
work_dir = 'work_dirs/ablations/cosim_levers_digits'
rows = ['CoSIM']
metrics = ['fd_digits', 'pr_precision', 'pr_recall', 'label_accuracy']
plot_x = 'model.time_sampler.R'
