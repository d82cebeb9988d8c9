"""``zero_sf.deepspeed`` is :mod:`zero_sf.integrations.deepspeed` (the DeepSpeed
glue moved there in issue #22; ``import zero_sf.deepspeed as zsd`` keeps
working, and both names are the same module object, so a patch of one is a
patch of the other)."""

import sys

from .integrations import deepspeed as _deepspeed

sys.modules[__name__] = _deepspeed
