"""The names a recipe chooses among, in a module that imports nothing: the config checks them without loading
the code that implements them, and that code takes its names from here."""

STRUCTURES = ("layer", "kv_group", "head", "intermediate", "hidden")  # the prunable structures (L0 gates)
CONSTRAINTS = ("exact", "row", "paper", "overall")  # pruning.constraint
EVAL_MASKS = ("current", "target")  # pruning.eval_masks
HARDEN_BY = ("usage", "logits")  # pruning.harden_by
LAYER_CHOICES = ("ranking", "loss")  # pruning.layer_choice
GATE_SCHEDULES = ("constant", "shared")  # optimizer.gate_schedule
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # weights' dtypes (distill.dtype, the scripts' --dtype)
