# sCT (Lu & Song 2024, continuous-time consistency *training*) on ring8: the sCD toy config with
# dx_t/dt = cos t·z − sin t·x₀ from the sample pair instead of the teacher's PF-ODE. The teacher is
# still built (the same fitted MLP as projects/cosim/toy2d.py): the student starts from its
# weights, and its rows stay in the evaluation table for comparison.
#   python tools/train.py configs/scm/toy2d_sct.py
_base_ = ['./toy2d.py']

model = dict(mode='sct')

method = 'sCT'
custom_hooks = [
    dict(type='SpeedHook'),
    dict(type='RandomStateHook'),
    dict(type='SampleVisualizationHook', interval=_base_.eval_interval),
    dict(type='ToyEvaluationHook', num_samples=20000, interval=_base_.eval_interval, evaluations=[
        dict(name=method, source='student', sampler=dict(_base_.student_sampler, num_steps=1)),
        dict(name=method, source='student', sampler=dict(_base_.student_sampler, num_steps=2)),
    ] + _base_.teacher_rows),
]
