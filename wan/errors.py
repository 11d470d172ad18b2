"""Error types the library raises for bad files and bad settings (each message is one line that names the fix)."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not match the model it should hold."""


class LoadTimeOptionError(ValueError):
    """A per-call request changed a choice that was fixed when the pipeline was built."""


class MemoryPlanError(ValueError):
    """--max_gpu_memory is too small for the run even with block streaming (knowable before loading)."""
