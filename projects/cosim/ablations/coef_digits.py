# CoSIM's Table 6 on the 8x8 digits: coef = α(1+λ) (α = 1.2) against the training length, from
# the digits teacher (projects/cosim/digits.py; it needs work_dirs/edm_digits/iter_5000.pth and
# the FD-digits detector, see configs/teachers/edm_digits.py). The full digits run is 3 000
# iterations; here 500 and 1 000, so the six runs fit in about half an hour on 2 CPU cores.
#   python tools/ablate.py projects/cosim/ablations/coef_digits.py --jobs 2
# Results: docs/ablations.md.
base = 'projects/cosim/digits.py'
axes = {
    'model.divergence.coef': [0.5, 0.75, 1.0],
    'train_cfg.max_iters': [500, 1000],
}
work_dir = 'work_dirs/ablations/cosim_coef_digits'
rows = ['CoSIM']
metrics = ['fd_digits', 'pr_precision', 'pr_recall', 'label_accuracy']
plot_x = 'model.divergence.coef'
