"""Keys of llm-foundry's and LLM-Shearing's YAML files, and ours for the same setting: an unknown key that is one
of them is refused with a pointer to ours (docs/recipes.md lists the table)."""

from __future__ import annotations

FOUNDRY, SHEARING = "llm-foundry", "LLM-Shearing"

# dotted key as the user wrote it -> (whose key it is, what to write instead)
FOREIGN_KEYS: dict[str, tuple[str, str]] = {
    "global_train_batch_size": (FOUNDRY, "train.global_batch_size"),
    "device_train_microbatch_size": (FOUNDRY, "train.micro_batch_size"),
    "device_eval_batch_size": (FOUNDRY, "train.eval_batch_size"),
    "max_duration": (FOUNDRY, "train.max_batches (a count of batches)"),
    "eval_interval": (FOUNDRY, "train.eval_interval (a count of batches)"),
    "eval_subset_num_batches": (FOUNDRY, "train.eval_batches"),
    "precision": (FOUNDRY, "train.precision"),
    "max_seq_len": (FOUNDRY, "data.seq_len"),
    "fsdp_config": (FOUNDRY, "fsdp (enabled, version, state_dict_type, mixed_precision, activation_checkpointing)"),
    "save_folder": (FOUNDRY, "checkpoint.save_folder"),
    "save_interval": (FOUNDRY, "checkpoint.save_interval (a count of batches)"),
    "save_num_checkpoints_to_keep": (FOUNDRY, "checkpoint.keep"),
    "autoresume": (FOUNDRY, "checkpoint.autoresume"),
    "load_path": (FOUNDRY, "checkpoint.load_path"),
    "train_loader": (FOUNDRY, "data (path, domains, seq_len; the train split is data.train_split)"),
    "eval_loader": (FOUNDRY, "data.eval_split"),
    "tokenizer": (FOUNDRY, "nothing: data is tokenized by scripts/prepare_data.py, exports take --tokenizer"),
    "model.name": (FOUNDRY, "model.pretrained (an HF directory, a .gguf file or a preset)"),
    "model.pretrained_model_name_or_path": (FOUNDRY, "model.pretrained"),
    "model.path": (SHEARING, "model.pretrained"),
    "optimizer.name": (FOUNDRY, "nothing: the optimizer is always decoupled AdamW"),
    "scheduler.name": (FOUNDRY, "nothing: the schedule is always linear warm-up then cosine"),
    "scheduler.t_warmup": (FOUNDRY, "scheduler.warmup (a count of batches)"),
    "model.l0_module": (SHEARING, "pruning (target, structures, sparsity_warmup, eval_masks, ...)"),
    "model.l0_module.lagrangian_warmup_steps": (SHEARING, "pruning.sparsity_warmup (a fraction of the run)"),
    "model.l0_module.target_model": (SHEARING, "pruning.target (d_model, n_layers, n_heads, n_kv_heads, "
                                               "intermediate_size)"),
    "model.l0_module.pruning_modules": (SHEARING, "pruning.structures (layer, kv_group, head, intermediate, hidden)"),
    "model.l0_module.eval_target_model": (SHEARING, "pruning.eval_masks: target (or current)"),
    "pruning.lagrangian_warmup_steps": (SHEARING, "pruning.sparsity_warmup (a fraction of the run)"),
    "pruning.lagrangian_warmup": (SHEARING, "pruning.sparsity_warmup (a fraction of the run)"),
    "pruning.target_model": (SHEARING, "pruning.target"),
    "pruning.pruning_modules": (SHEARING, "pruning.structures"),
    "pruning.eval_target_model": (SHEARING, "pruning.eval_masks: target (or current)"),
    "data.set_names": (SHEARING, "data.domains"),
    "data.proportion": (SHEARING, "data.proportions"),
    "data.target_loss": (SHEARING, "data.reference_losses"),
    "data.update_type": (SHEARING, "data.update (doremi, constant, ...)"),
}


def foreign_hint(key: str) -> str | None:
    """``"llm-foundry's key; ours: train.global_batch_size"`` for a known foreign dotted key, else None."""
    if key not in FOREIGN_KEYS:
        return None
    whose, ours = FOREIGN_KEYS[key]
    return f"{whose}'s key; ours: {ours}"
