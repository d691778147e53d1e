import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    # The tests run tiny models: intra-op threads cost more than they save there (about 10x more on busy cores).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
