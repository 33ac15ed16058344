# CoSIM's Table 6 on the toy: the regularisation strength coef = α(1+λ) (α = 1.2 fixed, so
# λ = coef/α − 1) against the training length, on ring8 (projects/cosim/toy2d.py). The paper
# sweeps coef ∈ {0.5, 0.75, 1.0} on ImageNet-64 with FD-DINOv2; here the same three values at two
# reduced lengths (the full toy run is 4 000 iterations) — 6 runs of 1–2 k iterations × batch 1024.
#   python tools/ablate.py projects/cosim/ablations/coef.py --jobs 2
# Results (table and plot): docs/ablations.md. The digits half of the ablation: coef_digits.py.
base = 'projects/cosim/toy2d.py'
axes = {
    'model.divergence.coef': [0.5, 0.75, 1.0],
    'train_cfg.max_iters': [1000, 2000],
}
work_dir = 'work_dirs/ablations/cosim_coef_toy'
rows = ['CoSIM']                       # the student's rows (the teacher's are equal in every variant)
metrics = ['mmd', 'near_mode', 'mode_tv', 'sw2']
plot_x = 'model.divergence.coef'
