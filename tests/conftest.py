import os

import pytest
import torch

# Tests run offline, on the CPU, with the shipped assets only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def toy_model():
    from erasure_core.toy.model import load_toy_model

    return load_toy_model()


@pytest.fixture(scope="session")
def oracle():
    from erasure_core.toy.classifier import load_oracle

    return load_oracle()
