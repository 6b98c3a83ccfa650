"""Peak memory of one bf16 training step, as it would be on a CUDA GPU, computed without one.

    python -m bench.memory --model gpt2 --batch 16 --seq 1024 [--system all] [--json PATH]
    python -m bench.memory --model gpt2 --batch 16 --seq 1024 --measure   # on a GPU: also measure it

How: each system's model, inputs and AdamW are built inside `FakeTensorMode` (tensors carry shape,
dtype and strides but no storage, so gpt2-xl costs nothing). One warm-up step creates the optimizer
state; the second step (zero_grad(set_to_none) -> forward under bf16 autocast -> backward -> AdamW
step) runs under `torch.distributed._tools.mem_tracker.MemTracker`, which follows every storage's life
and reports the peak by category (parameters, gradients, optimizer state, activations, temporaries).
Saved-tensor hooks record, per layer and per sub-module, what autograd keeps for the backward
(unique storages), which gives the per-layer table and the comparison with Korthikanti et al.

The CPU-only torch build cannot run autograd on fake *CUDA* tensors, so the fake tensors are CPU
tensors, and what differs between CPU and CUDA is made to behave as on CUDA:
1. autocast: CPU autocast has a different op policy (on CUDA layer_norm, softmax, log_softmax and the
   losses run in fp32; on CPU they do not). `CudaAutocast` (a TorchFunctionMode) applies the CUDA
   bf16 policy to the functions these models call, including autocast's cache of weight casts.
2. SDPA (nanogpt, hf-sdpa): on CUDA, SDPA with is_causal picks the flash backend, which saves q, k, v,
   the output (allocated (B, T, H, D) and returned transposed) and a fp32 logsumexp (B, H, T), never
   (T, T). SDPA calls are routed to `fgbench::flash_attention`, a custom op whose autograd saves exactly
   that. HF's eager attention is left alone: it really materialises the (T, T) scores and probabilities.
3. fastgpt runs its real kernels' custom ops. On CPU tensors `fastgpt.ops.use_triton` says no (no
   CUDA, no interpreter) and the model would take its PyTorch branch; `fastgpt_kernels_as_on_cuda`
   makes it say yes for the memory run, because these fake CPU tensors stand for CUDA tensors, where
   it says yes. The model then calls kernels.layer_norm / gelu / attention / linear_cross_entropy and
   the optimizer is kernels.FusedAdamW, i.e. the custom ops fastgpt::layer_norm_fwd, gelu_fwd,
   attention_fwd, linear_cross_entropy, adamw_step (and the backward ops). Under FakeTensorMode a
   custom op runs its registered fake implementation (output shapes, dtypes and strides; nothing
   launches), and autograd saves what each op's registered setup_context saves: what the kernels
   keep for the backward on CUDA. `FastgptOps` (a TorchDispatchMode) counts these calls and, because
   a fake implementation allocates only the outputs, holds around each call the workspace the real
   op allocates inside and frees before returning, as each kernel file registers it
   (`kernels._launch.register_workspace`: for the fused loss the vocabulary-padded weight copy and one
   chunk's logits; for attention's backward its fp32 delta (B, H, T)). It also passes each op the
   arguments its public function derives from CUDA autocast (`register_autocast_args`: the fused
   loss's compute dtype, LayerNorm's output dtype), which CudaAutocast cannot set for CPU tensors.

Other assumptions (printed with the results): dropout 0 everywhere (HF configs too); HF's loss shifts
labels (T-1 targets per row); no gradient clipping; CUDA's caching allocator rounds every block to 512
bytes (MemTracker does the same); cuBLAS workspaces and the CUDA context are not counted (they add a
few hundred MB to what NVML shows, but not to torch.cuda.max_memory_allocated).
"""
# The parts, by what they do: common (systems, sizes, units), policy (fake CPU tensors as on CUDA), model
# (one system's step under MemTracker; arithmetic checks; measure_cuda), ranks (--shard, --fit), render
# (the tables), cli (main).
from .common import BF16, MODELS, SYSTEM_HELP, SYSTEMS, VOCAB, fmt_bytes  # noqa: F401
from .policy import (CudaAutocast, FastgptOps, _sdpa_as_on_cuda, _with_recompute_autocast,  # noqa: F401
                     fastgpt_kernels_as_on_cuda, flash_attention, flash_attention_bwd)
from .model import (ASSUMPTIONS_COMMON, Result, SavedTensors, _blocks, _global_peak, _hf, _step,  # noqa: F401
                    _tracker, build, gpt2_params, korthikanti, make_adamw, measure_cuda, run_one)
from .ranks import (CARD_MARGIN, CARDS_GB, SHARD_MODES, RankResult, _card_holds, _fits,  # noqa: F401
                    _fsdp_tracker, _sharded_from, fit_table, run_fsdp, run_rank)
from .render import render, render_ranks  # noqa: F401
from .cli import main, main_ranks  # noqa: F401
