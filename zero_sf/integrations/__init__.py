"""Glue to the engines users train with, imported lazily by the code that
needs it: :mod:`zero_sf.integrations.fsdp` (FSDP2).  The DeepSpeed glue is
:mod:`zero_sf.deepspeed`."""
