"""`tuneforge merge-lora`: fold a LoRA / rsLoRA / DoRA adapter into its base model, one shard at a time.

The base model's safetensors shards are streamed: each shard is read, every adapter update that targets
one of its tensors is applied, the shard is written and freed. Peak memory is therefore about one shard
plus the adapter, whatever the size of the model. The math is PEFT's, restated on plain tensors:

    LoRA / rsLoRA   W' = W + s * B @ A,  s = alpha / r  (alpha / sqrt(r) with rsLoRA)
    DoRA            V  = W + s * B @ A,  W' = (m / ||V||_row) * V   (one norm per output feature)

`rank_pattern` / `alpha_pattern` give per-module r and alpha. Embedding LoRA (`lora_embedding_A/B`) and
`fan_in_fan_out` layers store the weight transposed, so they are merged in the transposed orientation.
Tensors saved whole in the adapter (`modules_to_save`, resized embeddings, `*.base_layer.weight`) replace
the base tensor before any delta is added. Tied input/output embeddings stay tied unless the adapter
makes them differ, in which case `lm_head.weight` is written and the tie is removed from config.json.

The result is written to a temporary sibling folder and renamed into place only when complete, so an
error never leaves a half-written model at the destination. Adapters on parameters (`target_parameters`,
MoE expert weights) are the exception to the streaming: PEFT merges them with the model in memory
(`merge_in_memory`).

    adapter.py     the adapter folder as per-tensor updates, and the math of one update
    base.py        the base checkpoint's tensors and shapes; the checks that the adapter fits it
    write.py       the merged shards, config, tokenizer and side files, published atomically
    for_config.py  which adapter, base and destination a config (and the command's options) means
"""

from .adapter import AdapterPlan, LoraUpdate, adapter_config, apply_update, read_adapter
from .base import BaseCheckpoint, open_base
from .for_config import base_model_dir, find_adapter_dir, merge_for_config
from .write import MergeReport, merge_adapter, merge_in_memory

run = merge_for_config  # the entry point of `tuneforge merge-lora`

__all__ = ["AdapterPlan", "BaseCheckpoint", "LoraUpdate", "MergeReport", "adapter_config", "apply_update",
           "base_model_dir", "find_adapter_dir", "merge_adapter", "merge_for_config", "merge_in_memory", "open_base",
           "read_adapter", "run"]
