"""Setting up a run from its RunPlan: the process group, the data loaders, the model and optimizer, the
kernel warm-up and the startup summary. Each is one function with explicit inputs; the loop calls them in order.

The data import surface (ShardLoader, DataError, prepare_default_data, DEFAULT_DATA_ROOT) is used here only.
"""
from __future__ import annotations

import contextlib
import datetime
import random
import time

import numpy as np
import torch
import torch.distributed as dist

from ..data import DEFAULT_DATA_ROOT, DataError, ShardLoader, prepare_default_data  # noqa: F401 (DataError: main)
from ..metrics import LOG_TXT, METRICS
from .options import TrainError

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(plan):
    dtype = AUTOCAST.get(plan.dtype)
    return torch.autocast(torch.device(plan.device).type, dtype=dtype) if dtype else contextlib.nullcontext()


def setup_distributed(plan) -> torch.device:
    """The device, and under torchrun the process group (nccl on CUDA, gloo on CPU)."""
    device = torch.device(plan.device)
    if plan.cuda:
        torch.cuda.set_device(device)
    if plan.ddp:
        # A stuck collective (a frozen or hung rank) raises after this long on gloo; on NCCL the watchdog
        # aborts the job. Either way the job ends instead of waiting forever.
        dist.init_process_group(backend="nccl" if plan.cuda else "gloo",
                                timeout=datetime.timedelta(seconds=plan.cfg.dist_timeout),
                                **({"device_id": device} if plan.cuda else {}))
    return device


def build_data(plan, log) -> tuple[ShardLoader, ShardLoader]:
    cfg, T = plan.cfg, plan.cfg.seq_len
    if cfg.data_root == DEFAULT_DATA_ROOT:  # a fresh machine: `python train.py` needs no other step
        if plan.local_rank == 0:
            prepare_default_data(cfg.data_root, log=log)
        if plan.ddp:
            dist.barrier()
    train = ShardLoader(cfg.data_root, "train", cfg.micro_batch_size, T, plan.rank, plan.world, plan.gcfg.vocab_size,
                        verbose=plan.master, pin_memory=plan.cuda, order=cfg.data_order, seed=cfg.seed)
    # One sequence per chunk: rank r evaluates sequences r, r + world, ... of the same eval set.
    val = ShardLoader(cfg.data_root, "val", 1, T, plan.rank, plan.world, plan.gcfg.vocab_size, verbose=plan.master)
    return train, val


def build_model(plan, device: torch.device, log):
    """(raw model, optimizer), seeded by --seed; --init_from's weights loaded."""
    from ..model import GPT
    from ..ops import attention_plan, backend_name

    cfg = plan.cfg
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if plan.cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    raw = GPT(plan.gcfg).to(device)
    if plan.init_state is not None:
        raw.load_state_dict(plan.init_state)
    raw.activation_checkpointing = cfg.activation_checkpointing
    optimizer = raw.configure_optimizers(weight_decay=cfg.weight_decay, lr=cfg.max_lr, device_type=device.type)
    log(f"model: {plan.model_name} ({raw.num_params() / 1e6:.1f}M parameters) | kernels: "
        f"{backend_name(plan.gcfg.kernels, device)} | optimizer: {type(optimizer).__name__} | "
        f"{plan.world} rank(s) | {cfg.total_batch_size:,} tokens per step = {cfg.micro_batch_size} x "
        f"{cfg.seq_len} x {plan.world} x {plan.accum} accumulation")
    aplan = attention_plan(device) if plan.gcfg.kernels != "torch" else None
    if aplan is not None:
        log(attention_line(plan.gcfg.kernels, aplan))
    raw.check_ids = False  # the loaders checked every token id; the model's check would sync per forward
    return raw, optimizer


def attention_line(mode: str, plan) -> str:
    """The startup line saying where attention runs on this GPU and why (`plan`: kernels.device_plan). With
    --kernels triton on a GPU whose attention goes to SDPA (compute capability < 8.0) the run is refused
    here, before anything trains, naming the GPU and the reason."""
    if plan.attention == "triton":
        return f"attention: Triton ({plan.reason})"
    if mode == "triton":
        raise TrainError(f"--kernels triton: {plan.reason}. Use --kernels auto (Triton for LayerNorm, GELU, the "
                         f"loss and AdamW; PyTorch SDPA for attention) or --kernels torch")
    return f"attention: PyTorch SDPA ({plan.reason})"


def log_summary(plan, train_loader, log_dir, log) -> None:
    """One block before step 0: what this run is and how long it is."""
    cfg, B, T = plan.cfg, plan.cfg.micro_batch_size, plan.cfg.seq_len
    dtype = plan.dtype + (" with loss scaling" if plan.dtype == "fp16" else "")
    train_tokens = train_loader.total * B * T
    epochs = cfg.max_steps * cfg.total_batch_size / max(1, train_tokens)
    watch = []
    if cfg.eval_interval:
        watch.append(f"val loss every {cfg.eval_interval}")
    if plan.sample_every:
        watch.append(f"sample every {plan.sample_every}")
    if plan.hellaswag_examples is not None:
        watch.append(f"HellaSwag ({len(plan.hellaswag_examples)} examples) every {cfg.hellaswag_interval}")
    watch.append(f"checkpoint every {cfg.checkpoint_interval} steps")
    log(f"run: {cfg.max_steps:,} steps x {cfg.total_batch_size:,} tokens = {cfg.max_steps * cfg.total_batch_size:,} "
        f"tokens | data: {train_tokens:,} train tokens in {len(train_loader.paths)} shard(s) -> {epochs:.2f} epochs "
        f"| dtype: {dtype}")
    log(f"watch: {', '.join(watch)} | logs: {log_dir / LOG_TXT}, {log_dir / METRICS}")


def uses_triton(plan, device) -> bool:
    """Whether this run's kernels are Triton's (on a GPU, or the interpreter's on CPU tensors)."""
    from ..ops import use_triton

    return plan.gcfg.kernels != "torch" and use_triton(plan.gcfg.kernels, torch.empty(0, device=device))


def warm_up_kernels(plan, device, model, core, strategy, optimizer, step_fn, log) -> None:
    """With Triton kernels, one forward/backward of a dummy batch, an optimizer step that the device-side skip
    flag turns into a no-op, and one loss-only evaluation forward, before step 0's timer: Triton compiles (and autotunes
    attention) for every kernel a step runs here, torch.compile too, so step 0's dt is a real step. Weights and
    optimizer state are unchanged, grads are dropped and the RNG restored, so training is unchanged. Under DDP
    every rank then launches rank 0's attention configs. `step_fn(skip)`: the loop's optimizer step."""
    from .state import AttentionConfigs, install_attention_configs

    t0 = time.perf_counter()
    rng = torch.get_rng_state(), torch.cuda.get_rng_state(device) if plan.cuda else None
    x = torch.zeros((plan.cfg.micro_batch_size, plan.cfg.seq_len), dtype=torch.long, device=device)
    model.train()
    with strategy.micro_step(model, last=False):  # no gradient sync: the dummy gradients are dropped
        with autocast(plan):
            _, loss = model(x, x, return_logits=False)
        loss.backward()
    step_fn(torch.ones((), dtype=torch.bool, device=device))  # the update kernels run and skip
    optimizer.zero_grad(set_to_none=True)
    core.eval()
    with torch.no_grad(), autocast(plan):
        core(x, x, return_logits=False)  # the loss-only cross-entropy of evaluate()
    core.train()
    torch.set_rng_state(rng[0])
    if plan.cuda:
        torch.cuda.set_rng_state(rng[1], device)
    configs = AttentionConfigs(log).state_dict()
    if plan.ddp and configs:
        table = [configs if plan.master else None]
        dist.broadcast_object_list(table, src=0)
        if not plan.master:
            install_attention_configs(table[0])
    if plan.cuda:
        torch.cuda.synchronize(device)
    log(f"kernel warm-up (compile and autotune) took {time.perf_counter() - t0:.1f}s")
