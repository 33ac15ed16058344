# CoSIM's sampler on the toy: number of steps (NFE) × the scale of the interior time points
# (MultistepSampler: σ_1..σ_{K−1} of the ρ-ramp multiplied by `scale`). No training: one trained
# student — the coef = 1, 2 000-iteration run of coef.py, so run that grid first — is evaluated
# with every sampler (20 000 samples each, the toy evaluation's noise and reference set).
#   python tools/ablate.py projects/cosim/ablations/coef.py --jobs 2     # the checkpoint
#   python tools/ablate.py projects/cosim/ablations/nfe.py --jobs 2
# Results: docs/ablations.md.
base = 'projects/cosim/toy2d.py'
checkpoint = 'work_dirs/ablations/cosim_coef_toy/coef1.0_max_iters2000/iter_2000.pth'
axes = {
    'model.sampler.num_steps': [1, 2, 3, 4, 6, 8],
    'model.sampler.scale': [1.0, 1.4, 1.7, 2.0, 2.5],
}
work_dir = 'work_dirs/ablations/cosim_nfe_toy'
rows = ['student']
metrics = ['mmd', 'near_mode', 'mode_tv', 'sw2']
plot_x = 'model.sampler.num_steps'
