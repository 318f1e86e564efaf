"""Per-GPU memory of one training run, by part, and its peak.

Parts that live for the whole run (weights, optimizer states, a reference copy) add to the largest of the
transient phases of a step:
- loss: the end of the forward pass, while the LM head + cross entropy runs one chunk of rows at a time
  (every layer's saved activations, the autocast weight copies, the loss's working set);
- backward: its first layer (saved activations still held, that layer's gradients and, with gradient
  checkpointing, its recomputed activations);
- update: all gradients, plus the optimizer's temporaries;
- generation (GRPO): the KV cache of every completion of the step.
The peak of torch's allocator is the largest phase; the GPU also holds the allocator's slack and the CUDA
context, reported as their own part.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import coefficients as k
from .model import Architecture, ModelFacts
from .settings import Settings


@dataclass
class Part:
    name: str
    bytes: int
    note: str = ""


@dataclass
class Estimate:
    settings: Settings
    parts: list[Part]
    phases: dict[str, int]  # transient bytes of each phase
    peak_phase: str
    allocated: int  # torch's peak allocated bytes
    total: int  # per GPU, with allocator slack and CUDA context
    host: int  # per process, CPU memory while training
    host_at_load: int  # per node, while the weights load
    gpu_memory: int
    extra: dict = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory

    def part(self, name: str) -> int:
        return next(p.bytes for p in self.parts if p.name == name)


# ---------------------------------------------------------------- activations
def residual_bytes(s: Settings) -> int:
    """Bytes of the residual stream: the embeddings' dtype (fp32 under full fine-tuning, and under single-GPU
    QLoRA when the unquantized weights are cast to fp32: kbit_fp32_unquantized)."""
    if s.upcast_unquantized:
        return 4
    return k.DTYPE_BYTES[s.weights_dtype]


def mlp_bytes(a: Architecture, s: Settings) -> int:
    """Per token, the MLP's saved gate output, up output and their SiLU product. In the compute dtype, except
    on QLoRA with an fp32 residual stream (kbit_fp32_unquantized): bitsandbytes' 4-bit layers return their
    input's dtype, so gate and up come out fp32, and so does the eager product (a compiled block keeps the
    product in the compute dtype: measured on an H100, docs/planner.md)."""
    c = s.compute_bytes
    if not s.upcast_unquantized:
        return (k.COMPILED_MLP_SAVED if s.compiled else k.MLP_SAVED) * c * a.intermediate
    wide = residual_bytes(s)
    return (2 * wide + (c if s.compiled else wide)) * a.intermediate


def layer_activation_bytes(a: Architecture, s: Settings, adapted: list[tuple[str, int, int]]) -> int:
    """Bytes autograd saves per token in one decoder layer (no checkpointing)."""
    if s.compiled:
        return _compiled_layer_bytes(a, s, adapted)
    c, r = s.compute_bytes, residual_bytes(s)
    b = 2 * k.NORM_FP32_INPUT * a.hidden + 2 * k.RSQRT_BYTES  # both RMSNorms' fp32 inputs
    b += _attention_bytes(a, s)
    b += mlp_bytes(a, s)
    if s.adapter is None:
        b += 2 * r * a.hidden  # the normalised inputs, for the norm weights' gradients
        # Each linear layer keeps its input for its weight's gradient. Under autocast with fp32 norms every
        # layer casts its own copy (q, k, v; gate, up); the output projection's input is the attention output.
        casts = 5 if r != c else 2
        b += casts * c * a.hidden + c * a.intermediate  # + the down projection's input
    else:
        # Frozen base layers keep nothing; each LoRA factor A keeps its (cast) input, factor B A's output.
        b += sum(c * fan_in + c * rank for _, fan_in, rank in adapted)
    return b


def _attention_bytes(a: Architecture, s: Settings) -> int:
    """q, k, v and the output in the compute dtype, and the fp32 log-sum-exp (flash / varlen kernels)."""
    c = s.compute_bytes
    b = c * (2 * a.q_dim + 2 * a.kv_dim) + k.LSE_BYTES * a.heads
    if s.attention == "eager":
        b += k.EAGER_PROBS * c * a.heads * min(s.sequence_len, s.tokens)
    return b


def _compiled_layer_bytes(a: Architecture, s: Settings, adapted: list[tuple[str, int, int]]) -> int:
    """torch_compile'd blocks: the compiler recomputes elementwise work (norm upcasts, casts, SiLU) in the
    backward instead of saving it, so each distinct matmul input is kept once, in the compute dtype.

    Full fine-tuning with `fp8` (float8 linear layers): the weight gradients need the float8 casts of the
    inputs, which the compiler recomputes from the normalised inputs' sources instead of saving the 16-bit
    inputs: it keeps neither normalised input nor the down projection's input, and the output projection's
    input as its 1-byte cast (tests/test_planner_compiled.py traces both blocks). With an adapter nothing changes:
    LoRA's factor A needs the 16-bit input either way.

    `torch_compile_recompute_elementwise` has the same three tensors recomputed in 16-bit (the output
    projection's input stays), with or without an adapter, and with float8 LoRA the down projection's float8
    input too; float8 full fine-tuning recomputes them already."""
    c, r = s.compute_bytes, residual_bytes(s)
    b = 2 * r * a.hidden + 2 * k.RSQRT_BYTES + _attention_bytes(a, s)
    b += mlp_bytes(a, s)
    if s.adapter is None and s.fp8:
        return b - c * a.hidden + a.q_dim
    recomputed = (2 * c * a.hidden + c * a.intermediate) if s.recompute_elementwise else 0
    if recomputed and s.adapter is not None and s.fp8:
        # Measured (docs/benchmarks.md, 8B LoRA with fp8_frozen_weights): one byte per intermediate element more,
        # the down projection's float8 input, which the frozen float8 layer keeps unless it is recomputed too.
        recomputed += a.intermediate
    if s.adapter is None:  # the two normalised inputs and the down input, unless recomputed
        return b + (2 * c * a.hidden + c * a.intermediate) - recomputed
    inputs = set()
    for name, fan_in, rank in adapted:
        b += c * rank
        if not name.endswith("o_proj"):  # the output projection's input is the attention output
            inputs.add((name.rsplit(".", 1)[0], fan_in))
    return b + sum(c * fan_in for _, fan_in in inputs) - recomputed


def outside_layers_bytes(a: Architecture, s: Settings) -> int:
    """Per token, outside the layers: rotary cos/sin, the final norm, its output, the trained rows picked
    from it and their gradient (computed with the loss)."""
    r = residual_bytes(s)
    b = 2 * a.head_dim * r + k.NORM_FP32_INPUT * a.hidden + 3 * r * a.hidden
    return b + (r * a.hidden if s.adapter is None else 0)


def activations(f: ModelFacts, s: Settings, checkpointing: bool) -> int:
    """Saved activations of one micro-batch at the end of the forward pass (with checkpointing, the layers
    past gradient_checkpointing_layers keep all of theirs)."""
    a, T = f.arch, s.tokens
    checkpointed = min(a.layers, a.layers if s.checkpointed_layers is None else s.checkpointed_layers)
    if not checkpointing:
        checkpointed = 0
    kept = residual_bytes(s) * a.hidden
    if s.saved_attention:  # the attention output and its fp32 log-sum-exp per head
        kept += s.compute_bytes * a.heads * a.head_dim + 4 * a.heads
    full = (a.layers - checkpointed) * layer_activation_bytes(a, s, f.adapted)
    return T * (checkpointed * kept + full + outside_layers_bytes(a, s))


def backward_workspace(f: ModelFacts, s: Settings) -> int:
    """The backward of one layer: its gradients in flight and, with checkpointing, its recomputed tensors."""
    a, T, c = f.arch, s.tokens, s.compute_bytes
    b = T * (k.BACKWARD_MLP_GRADS * c * a.intermediate + k.BACKWARD_RESIDUAL_GRADS * 4 * a.hidden)
    if s.gradient_checkpointing:
        b += T * layer_activation_bytes(a, s, f.adapted) + autocast_copies(f, s) // max(a.layers, 1)
    return b


def loss_chunk(f: ModelFacts, s: Settings) -> int:
    """models/losses.py's LinearCrossEntropy: one chunk of logits and its softmax, plus the head weight in the
    compute dtype and its fp32 gradient (accumulated over chunks) when the head trains."""
    a, c = f.arch, s.compute_bytes
    if not f.lm_head:
        return 0
    rows = min(s.tokens, max(k.MIN_CHUNK_ROWS, k.CHUNK_ELEMENTS_CUDA // a.vocab))
    per_logit = k.LOGIT_CHUNK_BYTES_COMPILED if s.compiled else k.LOGIT_CHUNK_BYTES
    b = rows * (per_logit * a.vocab + c * a.hidden)
    if f.head_bytes_per_element != c:
        b += c * a.vocab * a.hidden
    if f.head_trainable:
        b += 4 * a.vocab * a.hidden
    return b


def autocast_copies(f: ModelFacts, s: Settings) -> int:
    """Autocast caches a compute-dtype copy of every fp32 weight that trains, for the whole forward pass.
    FSDP2 runs without autocast: its mixed-precision policy gathers each layer in the compute dtype; DeepSpeed
    computes with a model cast to the compute dtype."""
    if s.precision == "no" or s.fsdp or s.zero_stage is not None or (s.compiled and not k.COMPILED_KEEPS_CASTS):
        return 0
    if s.adapter is None:
        return s.compute_bytes * f.matmul_params if k.DTYPE_BYTES[s.weights_dtype] != s.compute_bytes else 0
    return s.compute_bytes * f.trainable.count  # the fp32 LoRA factors


def kv_cache(f: ModelFacts, s: Settings) -> int:
    """GRPO's static KV cache: every completion of the step, prompt + completion slots, keys and values."""
    if not s.completions_per_step or s.server_generation:
        return 0
    a = f.arch
    rows = s.completions_per_step
    per_row = (s.prompt_len + s.completion_len) * a.layers * 2 * a.kv_dim * s.kv_cache_bytes
    return rows * (per_row + k.DECODE_LOGIT_BYTES * a.vocab)


def generation_copy(f: ModelFacts, s: Settings) -> int:
    """Copies of the policy for generation, kept for the whole run: under FSDP2 and ZeRO-3 a whole copy
    refreshed from the shards, for online methods and for generation during evaluation (engine/trainer.py);
    for online methods under full fine-tuning with fp32 weights a compute-dtype snapshot that the sampler
    generates from (rollout/snapshot.py; under FSDP2 and ZeRO-3 the whole copy is made in that dtype and is
    the snapshot), and with trl.async_prefetch one snapshot per rollout in flight, in the dtype the sampler
    generates in (rollout/async_prefetch.py)."""
    sharded = s.fsdp or s.zero_stage == 3  # the weights are partitioned: generation needs a whole copy
    half = bool(s.completions_per_step) and _half_precision_copy(s)
    sampled = s.compute_bytes * f.total if half else f.weight_bytes  # the weights the sampler generates from
    whole = sampled if sharded and (s.completions_per_step or s.eval_generation) else 0
    if not s.completions_per_step:
        return whole
    if s.server_generation:  # the weights are pushed to the server from the policy (or the whole copy)
        return whole
    return whole + (sampled if half and not whole else 0) + s.prefetch_snapshots * sampled


def _half_precision_copy(s: Settings) -> bool:
    """Full fine-tuning with fp32 weights under mixed precision generates from a compute-dtype copy."""
    fp32 = k.DTYPE_BYTES[s.weights_dtype] == 4 and s.adapter is None
    if s.zero_stage is not None and s.zero_stage < 3:  # DeepSpeed cast the model it generates with
        return False
    return fp32 and s.precision != "no" and s.half_precision_copy


# ---------------------------------------------------------------- states
def optimizer_bytes(f: ModelFacts, s: Settings) -> int:
    kind, states = k.OPTIMIZER_STATES.get(s.optimizer, ("like_param", 2 if s.optimizer != "adafactor" else 0))
    if s.optimizer == "sgd" and s.sgd_momentum:
        states = 1
    if s.kahan:  # torch-optimi's AdamW: both moments and the Kahan compensation, in the weights' dtype
        kind, states = "like_param", 3
    per = {"like_param": f.trainable_bytes_per_element, "fp32": 4, "int8": 1 + 4 / k.BNB_OPTIM_BLOCK,
           "int4": 0.5 + 4 / k.INT4_OPTIM_BLOCK}[kind]
    return int(f.trainable.count * per * states)


def gradient_bytes(f: ModelFacts) -> int:
    return int(f.trainable.count * f.trainable_bytes_per_element)


def reference_bytes(f: ModelFacts, s: Settings) -> int:
    """A frozen copy of the policy (full fine-tuning, loaded like the policy); adapters reuse the base."""
    if not s.reference or s.precompute_ref or s.adapter:
        return 0
    return f.weight_bytes


# ---------------------------------------------------------------- the whole
def _states(f: ModelFacts, s: Settings) -> tuple[int, int, int, int, int, int]:
    """(weights, master weights, gradients, optimizer states) on each GPU, what offload moved to CPU memory,
    and the sharded parameters in flight (FSDP2: the root group throughout, the layers one or two at a time)."""
    if s.zero_stage is not None:
        return _zero_states(f, s)
    weights, grads, optim = f.weight_bytes, gradient_bytes(f), optimizer_bytes(f, s)
    if not s.fsdp:
        return weights, 0, grads, optim, 0, 0
    n = s.gpus
    weights, grads, optim = -(-weights // n), -(-grads // n), -(-optim // n)
    layers = f.arch.layers if not s.reshard_after_forward else min(k.FSDP_LAYERS_IN_FLIGHT, f.arch.layers)
    gathered = _in_flight(f, s, layers)
    if s.offload:
        return 0, 0, 0, 0, weights + grads + optim, gathered
    return weights, 0, grads, optim, 0, gathered


def _in_flight(f: ModelFacts, s: Settings, layers: int) -> int:
    """Sharded parameters gathered whole: the root group and `layers` decoder layers, in the compute dtype (FSDP2's
    mixed-precision policy gathers in it; DeepSpeed's model is cast to it)."""
    size, stored = f.root_bytes + layers * f.layer_bytes, k.DTYPE_BYTES[s.weights_dtype]
    return size * s.compute_bytes // stored if s.precision != "no" and stored > s.compute_bytes else size


def _zero_states(f: ModelFacts, s: Settings) -> tuple[int, int, int, int, int, int]:
    """DeepSpeed ZeRO (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
    Models"): with bf16/fp16 DeepSpeed casts the model itself, weights and gradients, to the compute dtype, and
    its optimizer keeps an fp32 master copy of the trained weights beside fp32 states. Stage 1 partitions the
    master copy and the states over the processes, stage 2 the gradients too, stage 3 the weights too (gathered
    a layer or two at a time). offload_optimizer moves master copy and states to CPU memory, offload_param
    (stage 3) the weights."""
    n, stage, half = s.gpus, s.zero_stage, s.precision != "no"
    elt = s.compute_bytes if half else 4
    weights = f.weight_bytes if f.quantized else f.total * elt
    master = 4 * f.trainable.count if half else 0
    grads, optim = f.trainable.count * elt, optimizer_bytes(f, s)

    def part(size: int, from_stage: int) -> int:
        return -(-size // n) if stage >= from_stage else size

    weights, master, grads, optim = part(weights, 3), part(master, 1), part(grads, 2), part(optim, 1)
    gathered = _in_flight(f, s, min(k.FSDP_LAYERS_IN_FLIGHT, f.arch.layers)) if stage >= 3 else 0
    host = 0
    if s.zero_offload_optimizer:
        host, master, optim = master + optim, 0, 0
    if s.zero_offload_param and stage >= 3:
        host, weights = host + weights, 0
    return weights, master, grads, optim, host, gathered


def estimate(f: ModelFacts, s: Settings, gpu_memory: int) -> Estimate:
    weights, master, grads, optim, host_states, gathered = _states(f, s)
    casts = autocast_copies(f, s)
    acts_gc, acts_full = activations(f, s, True), activations(f, s, False)
    acts = acts_gc if s.gradient_checkpointing else acts_full
    offloaded = acts if s.activation_offloading else 0  # save_on_cpu: every saved tensor waits in CPU memory
    acts -= offloaded
    kv = kv_cache(f, s)
    # Earlier micro-batches' gradients stay during a forward; FSDP2 accumulates them unsharded (it reduce-
    # scatters on the step's last micro-batch only), on the GPU even with offload.
    accumulated = (gradient_bytes(f) if s.fsdp else grads) if s.grad_accum > 1 else 0
    layer_grads = f.layer_bytes if s.fsdp and s.adapter is None else 0  # before their reduce-scatter
    head_grad = 4 * f.arch.vocab * f.arch.hidden if f.head_trainable else 0
    foreach = k.FOREACH_TEMPORARIES.get(s.optimizer, 0) * gradient_bytes(f)
    backward_casts = casts if (s.fsdp or not s.gradient_checkpointing) else 0
    phases = {
        "loss": acts + casts + loss_chunk(f, s) + accumulated + gathered,
        "backward": acts + backward_casts + backward_workspace(f, s) + head_grad + accumulated + gathered
        + layer_grads,
        "update": grads + foreach,
        "generation": kv + gathered if kv else 0,
    }
    peak_phase = max(phases, key=phases.get)
    static = weights + master + optim + reference_bytes(f, s) + generation_copy(f, s)
    allocated = static + phases[peak_phase]
    overhead = int(allocated * k.ALLOCATOR_SLACK) + int(k.CUDA_CONTEXT_GIB * k.GiB)
    values = {"weights": weights, "master weights": master, "gradients": grads, "optimizer states": optim,
              "autocast weight copies": casts,
              "activations": acts, "activations (checkpointing)": acts_gc, "activations (no checkpointing)": acts_full,
              "generation KV cache": kv, "FSDP gathered layers": gathered, "CUDA context + allocator": overhead}
    process = int(k.HOST_PROCESS_GIB * k.GiB)
    # Each process of a machine reads the weights; under FSDP2 a 4-bit base is quantized after a 16-bit load.
    loaded = f.total * k.DTYPE_BYTES[s.weights_dtype] if s.fsdp and s.quantized else f.weight_bytes
    host_load = min(s.gpus, 8) * (process + loaded)
    return Estimate(s, _parts(f, s, values), phases, peak_phase, allocated, allocated + overhead,
                    process + host_states + offloaded, host_load, gpu_memory,
                    {"trainable": f.trainable.count, "frozen": f.frozen.count, "host_states": host_states})


def _parts(f: ModelFacts, s: Settings, v: dict[str, int]) -> list[Part]:
    snapshot = generation_copy(f, s)
    return [
        Part("weights", v["weights"], _weights_note(f, s)),
        Part("gradients", v["gradients"], _gradients_note(f, s)),
        Part("optimizer states", v["optimizer states"],
             ("torch-optimi AdamW, Kahan-compensated" if s.kahan else s.optimizer) + _zero_note(s, 1)),
        Part("master weights", v["master weights"], _master_note(s)),
        Part("autocast weight copies", v["autocast weight copies"], "compute-dtype copies of the trained fp32 weights"),
        Part("activations", v["activations"], f"{s.tokens} tokens/micro-batch, "
             + (_checkpointed_note(f, s) if s.gradient_checkpointing else "no checkpointing")
             + (", attention outputs kept" if s.saved_attention else "")
             + (", in CPU memory (activation_offloading)" if s.activation_offloading else "")),
        Part("activations (checkpointing)", v["activations (checkpointing)"],
             "each layer's input (one layer is recomputed in the backward)"),
        Part("activations (no checkpointing)", v["activations (no checkpointing)"], "every layer's saved tensors"),
        Part("logits chunk", loss_chunk(f, s), "LM head + cross entropy, one chunk of rows"),
        Part("reference model", reference_bytes(f, s), _reference_note(s)),
        Part("generation KV cache", v["generation KV cache"], _kv_note(s)),
        Part("generation weight copy", snapshot, _copy_note(s, snapshot)),
        Part("FSDP gathered layers", v["FSDP gathered layers"], "unsharded parameters in flight" if s.fsdp
             else "ZeRO-3's gathered parameters in flight" if s.zero_stage == 3 else "no FSDP"),
        Part("CUDA context + allocator", v["CUDA context + allocator"],
             f"{k.CUDA_CONTEXT_GIB} GiB + {k.ALLOCATOR_SLACK:.0%}"),
    ]


def _gradients_note(f: ModelFacts, s: Settings) -> str:
    if s.zero_stage is not None and s.precision != "no":
        return f"{s.precision}, in DeepSpeed's model" + _zero_note(s, 2)
    return "fp32" if f.trainable_bytes_per_element == 4 else "like the weights"


def _zero_note(s: Settings, from_stage: int) -> str:
    """Where DeepSpeed keeps a state that ZeRO partitions from `from_stage` on."""
    if s.zero_stage is None:
        return ""
    if from_stage == 1 and s.zero_offload_optimizer:
        return ", in CPU memory (offload_optimizer)"
    return f", partitioned over {s.gpus} (ZeRO-{s.zero_stage})" if s.zero_stage >= from_stage else ""


def _master_note(s: Settings) -> str:
    if s.zero_stage is not None and s.precision != "no":
        return "fp32 copy of the trained weights in DeepSpeed's optimizer" + _zero_note(s, 1)
    if s.adapter is not None:
        return "none: adapter weights are fp32"
    if s.kahan:
        return "none: bf16 weights, updates added with Kahan summation"
    return "none separate: full fine-tuning trains fp32 weights"


def _checkpointed_note(f: ModelFacts, s: Settings) -> str:
    if s.checkpointed_layers is None or s.checkpointed_layers >= f.arch.layers:
        return "checkpointed"
    return f"{s.checkpointed_layers} of {f.arch.layers} layers checkpointed"


def _weights_note(f: ModelFacts, s: Settings) -> str:
    kind = {"nf4": "NF4 4-bit base", "int8": "int8 base", "float8": "float8 frozen base"}.get(f.quantized or "",
                                                                                              s.weights_dtype)
    note = f"{f.total:,} params ({f.trainable.count:,} trainable), {kind}"
    if s.fsdp:
        note += f", sharded over {s.gpus}" + (" and offloaded to CPU" if s.offload else "")
    if s.zero_stage is not None and s.precision != "no" and not f.quantized:
        note = f"{f.total:,} params ({f.trainable.count:,} trainable), cast to {s.precision} by DeepSpeed"
    if s.zero_stage == 3:
        note += f", partitioned over {s.gpus}" + (" in CPU memory" if s.zero_offload_param else "")
    return note


def _reference_note(s: Settings) -> str:
    if not s.reference:
        return "not used by this method"
    if s.precompute_ref:
        return "precomputed log-probs: none held"
    return "the adapter-disabled base (no copy)" if s.adapter else "frozen full copy"


def _copy_note(s: Settings, size: int) -> str:
    if not size:
        return "none"
    parts = [f"whole copy for generation under {'FSDP2' if s.fsdp else 'ZeRO-3'}"] if s.fsdp or s.zero_stage == 3 else []
    if s.server_generation:
        return parts[0] + " (pushed to the generation server)"
    if _half_precision_copy(s):
        parts.append("bf16 snapshot of the fp32 policy")
    if s.prefetch_snapshots:
        parts.append(f"{s.prefetch_snapshots} snapshot(s) for trl.async_prefetch")
    return "; ".join(parts)


def _kv_note(s: Settings) -> str:
    if not s.completions_per_step:
        return "no generation"
    if s.server_generation:
        return "on the generation server (trl.use_vllm)"
    return (f"{s.completions_per_step} completions x ({s.prompt_len} + {s.completion_len}) tokens "
            f"({s.num_generations} per prompt)")
