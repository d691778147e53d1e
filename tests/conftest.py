import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    # The tests run tiny models: thread start-up costs more than it saves there, and far more on a busy machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
