"""Pictures of samples: scatter plots for 2-D data, grids for images."""
import os

import matplotlib
import numpy as np
import torch

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402


def image_grid(x, nrow=None):
    """[B, C, H, W] in [−1, 1] → uint8 HWC grid."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    b, c, h, w = x.shape
    nrow = nrow or int(np.ceil(np.sqrt(b)))
    ncol = int(np.ceil(b / nrow))
    grid = torch.zeros((c, ncol * h, nrow * w), dtype=torch.uint8)
    for i in range(b):
        r, q = divmod(i, nrow)
        grid[:, r * h:(r + 1) * h, q * w:(q + 1) * w] = x[i]
    grid = grid.permute(1, 2, 0).numpy()
    return np.repeat(grid, 3, axis=2) if c == 1 else grid


def scatter_image(panels, path=None, lim=None, size=3.2):
    """``panels``: list of (title, [N, 2] array). Returns the figure as uint8 HWC."""
    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels), size), squeeze=False)
    for ax, (title, pts) in zip(axes[0], panels):
        pts = np.asarray(pts)
        ax.scatter(pts[:, 0], pts[:, 1], s=0.5, alpha=0.4, linewidths=0)
        ax.set_title(title, fontsize=8)
        if lim is not None:
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
        ax.set_aspect('equal')
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return image


def save_samples_figure(x, path, title=''):
    """Save samples as a picture (scatter of the first two coordinates, or an image grid)."""
    if x.ndim == 2:
        lim = float(x[:, :2].abs().quantile(0.995)) * 1.1 + 1e-3
        return scatter_image([(title, x[:, :2].numpy())], path, lim=lim)
    grid = image_grid(x[:64])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    plt.imsave(path, grid)
    return grid
