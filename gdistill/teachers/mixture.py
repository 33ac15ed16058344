from ..data.toy_mixtures import make_mixture
from ..registry import TEACHERS
from .base import Teacher


@TEACHERS.register_module()
class MixtureTeacher(Teacher):
    """The exact denoiser of a Gaussian mixture (``gdistill.data.toy_mixtures``): a teacher
    with no approximation error, and the target a network teacher is fitted to."""

    def __init__(self, mixture=dict(name='ring8'), sigma_data=0.5):
        super().__init__()
        self.mixture = make_mixture(mixture)
        self.sigma_data = float(sigma_data)
        self.data_shape = (self.mixture.dim,)

    def edm_denoise(self, x, sigma, class_labels=None):
        return self.mixture.edm_denoise(x, sigma)

    def sample_data(self, n, generator=None):
        return self.mixture.sample(n, generator=generator)
