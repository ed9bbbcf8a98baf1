"""Drop-in replacements for torch.optim's SGD, RMSprop, Adagrad, Adam and AdamW with fused updates."""

from resfast.optim.adagrad import Adagrad
from resfast.optim.adam import Adam, AdamW
from resfast.optim.rmsprop import RMSprop
from resfast.optim.sgd import SGD

__all__ = ["SGD", "Adagrad", "Adam", "AdamW", "RMSprop"]
