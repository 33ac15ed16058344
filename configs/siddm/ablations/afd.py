# SIDDM's ablation on the toy (Xu et al. 2023 report the AFD term as critical): the AFD weight
# λ_AFD on/off × the discriminator's denoising regulariser on/off, on grid25 (configs/siddm/toy2d.py),
# one seed — 4 runs of 2 000 iterations × batch 1024.
#   python tools/ablate.py configs/siddm/ablations/afd.py --jobs 2
# Results (table and plot): docs/ablations.md.
base = 'configs/siddm/toy2d.py'
axes = {
    'model.divergence.afd_weight': [0.0, 1.0],
    'model.divergence.reg_weight': [0.0, 1.0],
}
seeds = [0]
work_dir = 'work_dirs/ablations/siddm_afd'
rows = ['SIDDM']
metrics = ['mmd', 'near_mode', 'mode_tv', 'sw2']
plot_x = 'model.divergence.afd_weight'
