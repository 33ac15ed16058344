# CoSIM's mixing distribution on a mixture with unequal weights: the model's own one-jump sample
# (mixing='model', gdistill's default) against the paper's x_t ~ p(x_t | x0) with x0 from the data
# (mixing='data', eq. 8 / Algorithm 2), three seeds each, on wring8 (ring8's geometry, weights
# alternating light/heavy, max/min = 4). The loader serves exact mixture samples in both variants
# (model mixing reads none of them), 1 000 iterations, checkpoints every 500 for
# docs/figures/cosim_weights.py (the mode-weight history and the re-jump diagnostic).
#   python tools/ablate.py projects/cosim/ablations/mixing_toy.py --jobs 2
#   python docs/figures/cosim_weights.py work_dirs/ablations/cosim_mixing_toy/mixing*_seed* --rejump --out w.json
# Results: docs/ablations.md ("CoSIM: mixing distribution"), docs/toy2d.md.
base = 'projects/cosim/toy2d.py'
axes = {'model.mixing': ['model', 'data']}
seeds = [0, 1, 2]
cfg_options = {
    'model.teacher.fit.target.mixture.name': 'weighted_ring',
    'train_dataloader.dataset.type': 'MixtureSampleDataset',
    'train_dataloader.dataset.mixture.name': 'weighted_ring',
    'train_cfg.max_iters': 1000,
    'default_hooks.checkpoint.interval': 500,
}
work_dir = 'work_dirs/ablations/cosim_mixing_toy'
rows = ['CoSIM']
metrics = ['mmd', 'near_mode', 'mode_tv', 'near_mode_tv']
plot_x = 'model.mixing'
