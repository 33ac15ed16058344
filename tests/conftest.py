import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread_float32():
    """Every test runs single-threaded (tiny tensors run fastest so and do not stall on a busy
    machine) and starts from float32, whatever an earlier test set."""
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
