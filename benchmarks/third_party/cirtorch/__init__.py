from . import datasets, examples, layers, networks, utils

from .datasets import datahelpers, genericdataset, testdataset, traindataset
from .layers import functional, loss, normalization, pooling
from .networks import imageretrievalnet
from .utils import general, download, evaluate, whiten