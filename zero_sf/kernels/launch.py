"""``zero_sf.kernels.launch`` is :mod:`zero_sf.kernels.host` (renamed in issue
#22: the host side of the kernels -- pointer tables, batching, launches --
not the top-level ``launch/`` jobs).  Both names are the same module object."""

import sys

from . import host as _host

sys.modules[__name__] = _host
