"""Makes docs/figures/hsivi_toy2d_history.png from a finished run of configs/hsivi/toy2d.py: the
student's MMD² and mode-weight TV at NFE 4 every `interval` iterations (eval_details.json), and
copies the run's samples.png to docs/figures/hsivi_toy2d_samples.png.

    python tools/train.py configs/hsivi/toy2d.py --work-dir work_dirs/hsivi_toy2d
    python docs/figures/hsivi_toy2d.py work_dirs/hsivi_toy2d
"""
import json
import os.path as osp
import shutil
import sys

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

HERE = osp.dirname(osp.abspath(__file__))


def main(work_dir):
    path = osp.join(work_dir, 'eval_details.json')
    if not osp.isfile(path):
        raise FileNotFoundError(f'{path} not found: run configs/hsivi/toy2d.py into {work_dir} first')
    details = json.load(open(path))
    hist = details['history']
    if not hist:
        raise ValueError(f'{path} has no evaluation history (the hook needs interval > 0)')
    it = [h['iter'] for h in hist]
    floor = next(r for r in details['rows'] if r['name'] == 'exact floor')
    teacher = next(r for r in details['rows'] if r['name'].startswith('teacher DDIM'))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, scale, label in ((axes[0], 'mmd', 1e3, 'MMD² ×10³'), (axes[1], 'mode_tv', 1, 'mode-weight TV')):
        ax.plot(it, [h[key] * scale for h in hist], 'o-', ms=3, label='HSIVI, NFE 4')
        ax.axhline(teacher[key] * scale, color='gray', ls='--', label='teacher DDIM-η, NFE 4 (= HSIVI at iteration 0)')
        ax.axhline(floor[key] * scale, color='k', ls=':', label='exact floor')
        ax.set_xlabel('iteration')
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle('HSIVI on ring8 (4 000 samples per point)', fontsize=10)
    fig.tight_layout()
    fig.savefig(osp.join(HERE, 'hsivi_toy2d_history.png'), dpi=120)
    shutil.copyfile(osp.join(work_dir, 'samples.png'), osp.join(HERE, 'hsivi_toy2d_samples.png'))


if __name__ == '__main__':
    main(sys.argv[1] if len(sys.argv) > 1 else 'work_dirs/hsivi_toy2d')
