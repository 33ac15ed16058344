from .base import Teacher

__all__ = ['Teacher']
from .mixture import MixtureTeacher
from .network import NetworkTeacher
from .edm import EDMTeacher
from .edm2 import EDM2Teacher, read_edm2_encoder  # registers EDM2's classes with the pickle loader
from .edm_pickle import load_edm_pickle, read_edm_pickle
