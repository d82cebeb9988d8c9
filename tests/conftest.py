import os

# The Triton kernels run on CPU tensors under the interpreter; the variable
# must be set before triton.jit decorates them (at zero_sf.kernels import).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from zero_sf.functional import triton_available  # noqa: E402

BACKENDS = ["torch"] + (["triton"] if triton_available() else [])


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
