import importlib.util
import os

# The Triton kernels run on CPU tensors under the interpreter; the variable
# must be set before triton.jit decorates them (at zero_sf.kernels import).
# ZERO_SF_TEST_DEVICE=cuda (make gpu-report) runs tests/kernels on the GPU,
# compiled, with the interpreter off.
if os.environ.get("ZERO_SF_TEST_DEVICE", "cpu") == "cuda":
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from zero_sf.functional import triton_available  # noqa: E402

# The test extra installs triton and deepspeed, and CI installs it: a missing
# one must fail loudly, not silently shrink the suite (every [triton] case,
# every DeepSpeed test).  Only an explicit ZERO_SF_SKIP_MISSING=1 (say, a GPU
# machine without DeepSpeed) lets those tests skip instead.
_missing = [name for name in ("triton", "deepspeed") if importlib.util.find_spec(name) is None]
if _missing and os.environ.get("ZERO_SF_SKIP_MISSING") != "1":
    raise pytest.UsageError(f"test dependencies missing: {_missing}; pip install -e '.[test]' "
                            "(or set ZERO_SF_SKIP_MISSING=1 to skip the tests that need them)")

def _cpu_backend_available() -> bool:
    from zero_sf import cpu
    return cpu.available()


# The fused CPU backend needs a C compiler (CI has gcc): without one its
# tests fail loudly too, unless ZERO_SF_SKIP_MISSING=1.
if not _cpu_backend_available() and os.environ.get("ZERO_SF_SKIP_MISSING") != "1":
    from zero_sf import cpu as _cpu
    raise pytest.UsageError(f"the fused CPU backend does not build here ({_cpu.unavailable_reason()});"
                            " install gcc (or set ZERO_SF_SKIP_MISSING=1 to skip its tests)")
BACKENDS = (["torch"] + (["cpu"] if _cpu_backend_available() else [])
            + (["triton"] if triton_available() else []))


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
