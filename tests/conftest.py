import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Every model in the tests is tiny: a second intra-op thread only adds OpenMP sync cost, and on a CPU shared
    with other processes it stalls in barriers (measured ~5x slower). Subprocesses get OMP_NUM_THREADS=1."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
