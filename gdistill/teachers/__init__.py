from .base import Teacher

__all__ = ['Teacher']
from .mixture import MixtureTeacher
from .network import NetworkTeacher
from .edm import EDMTeacher
from .edm_pickle import load_edm_pickle, read_edm_pickle
