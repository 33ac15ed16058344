"""The sample plots of `tools/compare_toy.py`'s runs side by side: one row per mixture (ring8,
grid25), one column per method (each run's final `samples.png`, its first panel: the method's
first evaluation row — CoSIM at NFE 4, sCD at 1 step; the exact samples are the last column).

    python docs/figures/toy_comparison.py [--work-dir work_dirs/compare] [--out docs/figures/toy_comparison.png]
"""
import argparse
import os.path as osp

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

METHODS = ('cosim', 'sid', 'hsivi', 'scd', 'siddm')
MIXTURES = ('ring8', 'grid25')


def panels(path):
    """The first and the last panel of a ``samples.png`` (a row of square panels: the evaluation
    rows in order, then the exact samples)."""
    image = plt.imread(path)
    n = max(1, round(image.shape[1] / image.shape[0]))
    width = image.shape[1] // n
    return image[:, :width], image[:, -width:]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--work-dir', default='work_dirs/compare')
    p.add_argument('--out', default='docs/figures/toy_comparison.png')
    args = p.parse_args()
    fig, axes = plt.subplots(len(MIXTURES), len(METHODS) + 1, figsize=(3 * (len(METHODS) + 1), 3 * len(MIXTURES)))
    for i, mixture in enumerate(MIXTURES):
        exact = None
        for j, method in enumerate(METHODS):
            ax = axes[i, j]
            ax.axis('off')
            path = osp.join(args.work_dir, mixture, method, 'samples.png')
            if not osp.isfile(path):
                ax.set_title(f'{method}: no run', fontsize=9)
                continue
            left, right = panels(path)
            exact = right if exact is None else exact
            ax.imshow(left)
            ax.set_title(f'{mixture} · {method}', fontsize=9)
        axes[i, -1].axis('off')
        if exact is not None:
            axes[i, -1].imshow(exact)
            axes[i, -1].set_title(f'{mixture} · exact', fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=80)
    print('written to', args.out)


if __name__ == '__main__':
    main()
