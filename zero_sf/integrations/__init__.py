"""Glue to the engines users train with, on top of the core: :mod:`.deepspeed`
(``zero_sf.deepspeed``), :mod:`.fsdp` (FSDP2) and :mod:`.transformers` (the
Hugging Face Trainer).  The core (optim, sharding, checkpoint, modes) never
imports them; they plug in through registries the core owns
(``optim._base.DTENSOR_SWITCH_HOOKS``, ``modes.register_engine_resolver``),
which ``zero_sf/__init__.py`` fills at import.  None imports its engine
(deepspeed, transformers) at import time."""
