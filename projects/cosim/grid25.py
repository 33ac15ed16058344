# CoSIM on grid25 (25 equal Gaussians of std 0.1 on a 5 x 5 grid of spacing 2) in the setting
# where the students resolve the modes: the score-based losses alone leave every one-step student
# a blur there (near-mode ≈ 0.2 against the teacher's 0.88; docs/toy_comparison.md), so the
# generator's update adds DMD's regression onto the teacher's Heun-35 samples at each of the
# sampler's levels (model.regression, gdistill/distillers/regression.py), and the generator steps
# at 1e-3 with Adam β₁ = 0.9 (at the toy's 5e-5 even an exact regression reaches only 0.22 in
# 4 000 steps). Same teacher, batch, f_ψ optimiser and budget as toy2d.py.
#   python tools/train.py projects/cosim/grid25.py
# Results over three seeds: docs/toy_comparison.md ("grid25 with the regression term").
_base_ = ['toy2d.py']

mixture = dict(name='grid25')
# the levels of MultistepSampler(num_steps=4, scale=1.7), to 4 decimals; NFE 2 calls at 80 and 4.2759
levels = [80.0, 29.7973, 4.2759, 0.2886]
model = dict(
    teacher=dict(fit=dict(target=dict(mixture=mixture))),
    regression=dict(weight=10.0, num_pairs=200_000, levels=levels, cache_dir='work_dirs/.teacher_cache'),
)
optim_wrapper = dict(generator=dict(optimizer=dict(lr=1e-3, betas=(0.9, 0.999))))
