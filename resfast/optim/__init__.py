"""Drop-in replacements for torch.optim's SGD, RMSprop, Adagrad, Adam and AdamW with fused updates, and
LARS (which torch.optim lacks) with its MLPerf param groups."""

from resfast.optim.adagrad import Adagrad
from resfast.optim.adam import Adam, AdamW
from resfast.optim.lars import LARS, lars_param_groups
from resfast.optim.rmsprop import RMSprop
from resfast.optim.sgd import SGD

__all__ = ["LARS", "SGD", "Adagrad", "Adam", "AdamW", "RMSprop", "lars_param_groups"]
