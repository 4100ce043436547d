import contextlib

import torch

device = torch.device("cpu")


def autocast(disable=False):
    return contextlib.nullcontext()
