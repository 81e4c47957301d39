import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: thread hand-offs cost far more than the work (and a busy machine makes that much worse)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
