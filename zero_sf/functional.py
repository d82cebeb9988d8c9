"""``zero_sf.functional`` is :mod:`zero_sf.dispatch` (renamed in issue #22:
the module dispatches the update to a backend -- the torch path of
:mod:`zero_sf.spec`, the Triton kernels, the fused CPU backend -- and
handles DTensor local shards; the math itself is :mod:`zero_sf.spec`).
Both names are the same module object."""

import sys

from . import dispatch as _dispatch

sys.modules[__name__] = _dispatch
