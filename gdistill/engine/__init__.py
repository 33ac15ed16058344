from . import hooks, optim, toy_eval
from .runner import GdRunner, build_runner
