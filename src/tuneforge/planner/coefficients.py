"""Every constant of the memory model, in one place, so that a measurement can calibrate it.

The activation terms are bytes per token per decoder layer of a Llama-style block (RMSNorm, attention with
rotary embeddings, gated SiLU MLP), counted from the tensors autograd saves for the backward pass. They
were derived op by op and checked against the saved tensors of a real transformers LlamaDecoderLayer
(tests/test_planner.py counts them with `torch.autograd.graph.saved_tensors_hooks`). The remaining
constants (logits chunk working set, CUDA context, allocator slack) are estimates the GPU benchmark
`bench/memory_plan.py` calibrates; docs/planner.md records the measured ratios.
"""

from __future__ import annotations

GiB = 2**30

# ---------------------------------------------------------------- bytes of one element
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1, "int8": 1}

# ---------------------------------------------------------------- quantized weights (bitsandbytes)
BITSANDBYTES = ("nf4", "int8")  # the bases bitsandbytes quantizes (QLoRA, 8-bit LoRA); "float8": fp8_frozen_weights
# NF4: 4 bits per weight, one absmax per block of 64 weights. With double quantization (tuneforge's
# default) the absmax is itself stored in 8 bits with an fp32 constant per 256 absmax values.
NF4_BITS = 4
NF4_BLOCK = 64
NF4_DOUBLE_QUANT_BLOCK = 256
# LLM.int8: one int8 per weight plus an fp32 scale per output row.
INT8_ROW_SCALE_BYTES = 4

# ---------------------------------------------------------------- optimizer states, bytes per trainable element
# None: the states follow the parameter's dtype (torch AdamW keeps exp_avg and exp_avg_sq like the weights).
OPTIMIZER_STATES = {
    "adamw_torch": ("like_param", 2),
    "adamw_torch_fused": ("like_param", 2),
    "adamw": ("like_param", 2),
    "paged_adamw_32bit": ("fp32", 2),
    "lion_32bit": ("fp32", 1),
    # bitsandbytes 8-bit: one byte per state plus an fp32 absmax per block of 256 (blockwise quantization).
    "adamw_8bit": ("int8", 2),
    "adamw_bnb_8bit": ("int8", 2),
    "paged_adamw_8bit": ("int8", 2),
    "lion_8bit": ("int8", 1),
    "paged_lion_8bit": ("int8", 1),
    "sgd": ("like_param", 0),  # plus one momentum buffer when optim_args sets momentum
    "rmsprop": ("like_param", 1),
    "adagrad": ("like_param", 1),
    "ademamix": ("like_param", 3),  # two first moments (fast, slow) and the second moment
    "ademamix_8bit": ("int8", 3),
    "paged_ademamix_8bit": ("int8", 3),
    "paged_ademamix_32bit": ("fp32", 3),
    "muon": ("like_param", 1),  # momentum (embeddings, head and 1-D parameters take AdamW's two: not split out)
    "adamw_torch_8bit": ("int8", 2),  # torchao low-bit AdamW
    "ao_adamw_8bit": ("int8", 2),
    "adamw_torch_4bit": ("int4", 2),
    "ao_adamw_4bit": ("int4", 2),
    "ao_adamw_fp8": ("int8", 2),
    "schedule_free_adamw": ("like_param", 2),  # z and the second moment
    "schedule_free_radam": ("like_param", 2),
    "schedule_free_sgd": ("like_param", 1),
    "optimi_adamw": ("like_param", 2),
    "optimi_adam": ("like_param", 2),
    "optimi_radam": ("like_param", 2),
    "optimi_stableadamw": ("like_param", 2),
    "stable_adamw": ("like_param", 2),
    "optimi_ranger": ("like_param", 3),  # Adam's two and Lookahead's slow weights
    "optimi_adan": ("like_param", 4),  # three moments and the previous gradient
    "optimi_lion": ("like_param", 1),
    "lion": ("like_param", 1),
    "optimi_sgd": ("like_param", 0),
}
BNB_OPTIM_BLOCK = 256
INT4_OPTIM_BLOCK = 128  # torchao 4-bit states: one fp32 scale per 128
# The non-fused torch AdamW (foreach) builds a temporary list of sqrt(exp_avg_sq) + eps, one element per
# trainable parameter in the states' dtype, during the step; the fused kernel and bitsandbytes do not.
FOREACH_TEMPORARIES = {"adamw_torch": 1, "adamw": 1}

# ---------------------------------------------------------------- activations (bytes per token per layer)
# Terms of the saved-tensor count (see activations.py for how they combine):
NORM_FP32_INPUT = 4  # x H: RMSNorm upcasts its input to fp32 and keeps it (the input itself when fp32)
RSQRT_BYTES = 4  # x 2 norms: the fp32 reciprocal RMS per token
LSE_BYTES = 4  # x heads: flash/varlen attention keeps the fp32 log-sum-exp per head
MLP_SAVED = 3  # x I x compute bytes: gate output (SiLU), up output and SiLU output (their product)
# Eager attention keeps the softmax probabilities: heads x T per token, in the compute dtype.
EAGER_PROBS = 1
# torch_compile'd blocks (inductor's min-cut partition): the gate, up and SiLU outputs are kept; the
# weights' compute-dtype casts are recomputed from the fp32 weights rather than kept.
COMPILED_MLP_SAVED = 3
COMPILED_KEEPS_CASTS = False
# Gradient checkpointing recomputes one layer in the backward; besides that layer's saved tensors the
# backward holds gradients of its largest intermediates: about this many [T, I] tensors in compute dtype
# plus [T, H] fp32 gradients of the residual stream.
BACKWARD_MLP_GRADS = 3
BACKWARD_RESIDUAL_GRADS = 2

# ---------------------------------------------------------------- loss (models/losses.py)
# LinearCrossEntropy per chunk of rows: the logits in the compute dtype (2), their fp32 copy (4),
# x - logsumexp (4), its exp (4): 14 bytes per logit at the moment of the exp (the fp32 gradient that
# replaces them reuses the space of the freed temporary).
LOGIT_CHUNK_BYTES = 14
# With torch_compile the softmax-and-gradient step is one fused kernel: logits in, gradient out.
LOGIT_CHUNK_BYTES_COMPILED = 6
# The chunk size itself is the loss's own (models/logprobs.py): rows = max(MIN_CHUNK_ROWS, elements / V).
from tuneforge.models.logprobs import CHUNK_ELEMENTS_CUDA, MIN_CHUNK_ROWS  # noqa: E402,F401

# ---------------------------------------------------------------- GRPO generation
# Besides the KV cache: the decode step's fp32 logits [rows, V] and the sampler's buffers, per row.
DECODE_LOGIT_BYTES = 4 * 2

# ---------------------------------------------------------------- FSDP2
# Decoder layers gathered at once with reshard_after_forward: the running one and the prefetched next.
FSDP_LAYERS_IN_FLIGHT = 2

# ---------------------------------------------------------------- the device
CUDA_CONTEXT_GIB = 0.55  # CUDA context, cuBLAS/cuDNN workspaces: outside torch's allocator
ALLOCATOR_SLACK = 0.06  # reserved / allocated: the caching allocator's rounding and fragmentation
HOST_PROCESS_GIB = 3.0  # a training process's own host memory (Python, torch, CUDA runtime), without weights
