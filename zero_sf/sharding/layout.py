"""``zero_sf.sharding.layout`` is :mod:`zero_sf.layout` (moved in issue #22: the
single-device optimizers, checkpoints and DeepSpeed number elements with it
too, and a module under ``sharding`` would make them import the sharded
optimizer)."""

import sys

from .. import layout as _layout

sys.modules[__name__] = _layout
