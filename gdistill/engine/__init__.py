from . import hooks, optim, toy_eval
from . import image_eval  # noqa: F401
from .runner import GdRunner, build_runner
