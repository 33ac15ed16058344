# CoSIM on grid25 (25 equal Gaussians of std 0.1 on a 5 x 5 grid of spacing 2) in the setting
# where the students resolve the modes: the score-based losses alone leave every one-step student
# a blur there (near-mode ≈ 0.2 against the teacher's 0.88; docs/toy_comparison.md), so this is
# toy2d_regression.py: DMD's regression onto the teacher's Heun-35 samples at each of the
# sampler's levels, the generator at 1e-3 with Adam β₁ = 0.9.
#   python tools/train.py projects/cosim/grid25.py
# Results over three seeds: docs/toy_comparison.md ("grid25 with the regression term").
_base_ = ['toy2d_regression.py']

mixture = dict(name='grid25')
model = dict(teacher=dict(fit=dict(target=dict(mixture=mixture))))
