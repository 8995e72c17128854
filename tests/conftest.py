import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
# Tests use tiny tensors: one intra-op thread is fastest and avoids OpenMP spin-waiting when
# the machine is shared. (Code under test that sets threads restores them.)
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
