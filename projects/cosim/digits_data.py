# CoSIM on the 8x8 digits with the paper's mixing distribution (eq. 8, Algorithm 2): the kernel's
# input is x_t = x0 + σ(t)·ε with x0 (and its label) from the training split, not the generator's
# own one-jump sample. Otherwise projects/cosim/digits.py; the end-of-run table holds the student
# rows only (the teacher rows do not depend on the student: see digits.py's metrics.json).
#   python tools/train.py projects/cosim/digits_data.py
# With model.mixing='model' this config is digits.py fed the data's labels (model mixing reads no
# images), which makes it the base of the mixing ablation (projects/cosim/ablations/levers_digits.py).
_base_ = ['digits.py']

model = dict(mixing='data')
train_dataloader = dict(_delete_=True, batch_size=_base_.batch_size, num_workers=0,
                        sampler=dict(type='InfiniteSampler', shuffle=True),
                        dataset=dict(type='DigitsDataset', split='train'))
_metric_hook = _base_.custom_hooks[3]
custom_hooks = [*_base_.custom_hooks[:3], dict(_metric_hook, evaluations=_metric_hook['evaluations'][:3])]
