# CoSIM with DMD's regression term (Yin et al. 2024, §3.3; not in CoSIM) at each of the sampler's
# levels: the generator's update adds λ·½‖G(x; σ) − y‖² on a pool of 200 000 pairs, y the
# teacher's Heun-35 sample from the latent z and x the teacher's ODE trajectory at σ (80·z at
# σ = 80), so every call of the 4-step chain is pulled towards the map that makes it exact
# (gdistill/distillers/regression.py). The generator steps at 1e-3 with Adam β₁ = 0.9: at the toy's
# 5e-5, β₁ = 0 even a plain regression does not converge in this budget (docs/toy_comparison.md).
# Teacher, f_ψ, batch and budget as toy2d.py. Over three seeds it resolves grid25 (grid25.py) and
# holds the weights of unequal-weight mixtures at the teacher's, without drift (docs/toy2d.md,
# "One setting for every mixture"); any mixture through tools/compare_toy.py --methods cosim_pairs.
#   python tools/train.py projects/cosim/toy2d_regression.py
_base_ = ['toy2d.py']

# the levels of MultistepSampler(num_steps=4, scale=1.7), to 4 decimals; NFE 2 calls at 80 and 4.2759
levels = [80.0, 29.7973, 4.2759, 0.2886]
model = dict(regression=dict(weight=10.0, num_pairs=200_000, levels=levels, cache_dir='work_dirs/.teacher_cache'))
optim_wrapper = dict(generator=dict(optimizer=dict(lr=1e-3, betas=(0.9, 0.999))))
