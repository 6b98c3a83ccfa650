"""FusedAdamW against torch.optim.AdamW: same trajectory, state_dicts, launch count, errors.

Runs the Triton kernel through the interpreter on CPU tensors here; the `cuda` variants run the
compiled kernel on a GPU (`pytest -m gpu`).
"""
import copy

import pytest
import torch

import kernels
from kernels.adamw import FusedAdamW, adamw_step, adamw_step_reference
from fastgpt import GPT, GPTConfig, ops

DEVICES = ["kernel", pytest.param("cuda", marks=pytest.mark.gpu)]


def _dev(device, kernel_device):
    return kernel_device if device == "kernel" else device


def _model_params(device):
    """A small GPT's parameters (embeddings, qkv/proj/fc weights, biases, LayerNorm params)."""
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=16, vocab_size=101, n_layer=2, n_head=2, n_embd=32, kernels="torch")
    model = GPT(cfg).to(device)
    return [p.detach().clone() for p in model.parameters()]


def _groups(params, wd=0.1):
    # configure_optimizers' split: decay on >= 2-D tensors, none on biases / LayerNorm
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": wd},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def _make(cls, base, **kw):
    params = [torch.nn.Parameter(p.clone()) for p in base]
    return params, cls(_groups(params), **kw)


def _set_grads(step, params_list, skip_every=7):
    """The same random grads for each copy; every `skip_every`-th tensor gets no grad on odd steps."""
    gen = torch.Generator().manual_seed(1000 + step)
    for i, ps in enumerate(zip(*params_list)):
        g = torch.randn(ps[0].shape, generator=gen, dtype=torch.float32).to(ps[0].device)
        for p in ps:
            p.grad = None if (step % 2 and i % skip_every == 0) else g.clone()


def _set_lr(opt, step):
    for k, group in enumerate(opt.param_groups):
        group["lr"] = 3e-3 * (0.85 ** step) * (1 + k)  # changes every step, differs per group


def _max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("device", DEVICES)
def test_matches_torch_adamw_with_state_dict_round_trip(device, kernel_device, expect_launch):
    dev = _dev(device, kernel_device)
    base = _model_params(dev)
    kw = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    ref_p, ref = _make(torch.optim.AdamW, base, **kw)
    our_p, ours = _make(FusedAdamW, base, **kw)
    for step in range(20):
        if step == 10:
            # save mid-run and continue in a fresh optimizer over fresh params holding the same values
            sd = copy.deepcopy(ours.state_dict())
            fresh_p = [torch.nn.Parameter(p.detach().clone()) for p in our_p]
            ours = FusedAdamW(_groups(fresh_p), **kw)
            ours.load_state_dict(sd)
            our_p = fresh_p
        _set_grads(step, [ref_p, our_p])
        _set_lr(ref, step)
        _set_lr(ours, step)
        ref.step()
        with expect_launch("adamw"):
            ours.step()
        assert _max_diff(ref_p, our_p) <= 1e-6, f"step {step}"
    for p_ref, p_our in zip(ref_p, our_p):
        s_ref, s_our = ref.state[p_ref], ours.state[p_our]
        assert s_our["step"].dtype == s_ref["step"].dtype and s_our["step"].device == s_ref["step"].device
        assert s_our["step"].item() == s_ref["step"].item()  # per-param counts (some params skipped)
        torch.testing.assert_close(s_our["exp_avg"], s_ref["exp_avg"], atol=1e-6, rtol=0)
        torch.testing.assert_close(s_our["exp_avg_sq"], s_ref["exp_avg_sq"], atol=1e-6, rtol=0)
    assert {k for s in ours.state_dict()["state"].values() for k in s} == {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.parametrize("device", DEVICES)
def test_loads_torch_adamw_state_dict(device, kernel_device):
    dev = _dev(device, kernel_device)
    base = _model_params(dev)[:6]
    kw = dict(lr=1e-3, weight_decay=0.05)
    ref_p, ref = _make(torch.optim.AdamW, base, **kw)
    for step in range(3):
        _set_grads(step, [ref_p])
        ref.step()
    our_p = [torch.nn.Parameter(p.detach().clone()) for p in ref_p]
    ours = FusedAdamW(_groups(our_p), **kw)
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))
    for step in range(3, 6):
        _set_grads(step, [ref_p, our_p])
        ref.step()
        ours.step()
    assert _max_diff(ref_p, our_p) <= 1e-6
    # and back: torch's AdamW continues from ours
    back = torch.optim.AdamW(_groups(our_p), **kw)
    back.load_state_dict(copy.deepcopy(ours.state_dict()))
    _set_grads(6, [ref_p, our_p])
    ref.step()
    back.step()
    assert _max_diff(ref_p, our_p) <= 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_grads(device, grad_dtype, kernel_device, expect_launch):
    """bf16/fp16 grads (through the op: autograd keeps p.grad in p's dtype) == fp32 math on the upcast grads."""
    dev = _dev(device, kernel_device)
    torch.manual_seed(0)
    shapes = [(96, 32), (32,), (7, 5), (2049,)]
    params = [torch.randn(s, device=dev) for s in shapes]
    ref_params = [p.clone() for p in params]
    ms = [torch.zeros_like(p) for p in params]
    vs = [torch.zeros_like(p) for p in params]
    ref_ms, ref_vs = [m.clone() for m in ms], [v.clone() for v in vs]
    n = len(params)
    for step in range(1, 6):
        grads = [torch.randn(s, device=dev).to(grad_dtype) for s in shapes]
        scal = ([1e-2 / step] * n, [0.1, 0.0, 0.1, 0.0], [0.9] * n, [0.95] * n, [1e-8] * n, [float(step)] * n)
        with expect_launch("adamw"):
            adamw_step(params, grads, ms, vs, *scal)
        adamw_step_reference(ref_params, [g.float() for g in grads], ref_ms, ref_vs, *scal)
    assert _max_diff(params, ref_params) <= 1e-6
    assert _max_diff(ms, ref_ms) <= 1e-6
    assert _max_diff(vs, ref_vs) <= 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_launches_do_not_grow_with_tensor_count(device, kernel_device):
    dev = _dev(device, kernel_device)

    def launches_per_step(n_tensors):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(16 * (i + 1), device=dev)) for i in range(n_tensors)]
        opt = FusedAdamW([{"params": ps[::2], "weight_decay": 0.1}, {"params": ps[1::2], "weight_decay": 0.0}])
        for p in ps:
            p.grad = torch.randn_like(p)
        before = kernels.launches("adamw")
        opt.step()
        return kernels.launches("adamw") - before

    assert launches_per_step(3) == launches_per_step(30) == 1


@pytest.mark.parametrize("option,value", [("amsgrad", True), ("maximize", True), ("foreach", True),
                                          ("capturable", True), ("differentiable", True), ("fused", True)])
def test_unsupported_options_raise(option, value):
    p = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match=option):
        FusedAdamW([p], **{option: value})


def test_unsupported_option_in_loaded_state_dict_raises(kernel_device):
    p = torch.nn.Parameter(torch.zeros(16, device=kernel_device))
    src = torch.optim.AdamW([p], amsgrad=True)
    opt = FusedAdamW([p])
    opt.load_state_dict(src.state_dict())
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="amsgrad"):
        opt.step()


def test_opcheck(kernel_device):
    """torch.library's checks of the mutating op's schema and fake implementation."""
    ps = [torch.randn(32, device=kernel_device), torch.randn(16, 16, device=kernel_device)]
    args = (ps, [torch.randn_like(p) for p in ps], [torch.zeros_like(p) for p in ps],
            [torch.zeros_like(p) for p in ps], [1e-3] * 2, [0.1, 0.0], [0.9] * 2, [0.95] * 2, [1e-8] * 2, [1.0] * 2)
    torch.library.opcheck(torch.ops.fastgpt.adamw_step.default, args)


@pytest.mark.parametrize("mode", ["auto", "triton"])
def test_make_optimizer_routes_to_fused(mode, kernel_device):
    model = GPT(GPTConfig(block_size=16, vocab_size=101, n_layer=1, n_head=2, n_embd=32, kernels=mode)).to(kernel_device)
    opt = model.configure_optimizers(weight_decay=0.1, lr=6e-4, device_type=kernel_device)
    assert isinstance(opt, FusedAdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.param_groups[0]["betas"] == (0.9, 0.95) and opt.param_groups[0]["lr"] == 6e-4
    torch_opt = ops.make_optimizer(_groups(list(model.parameters())), lr=1e-3, device_type="cpu", mode="torch")
    assert type(torch_opt) is torch.optim.AdamW


# ------------------------------------------------------------------------------------------------
# Device-resident tables: no host -> device copy per step (issue 11)
# ------------------------------------------------------------------------------------------------
def test_step_reuses_its_device_tables(kernel_device, monkeypatch):
    """After the first step the pointer and hyperparameter tables stay the same tensors (the LR schedule
    writes its cells in place), no tensor is created from host data or copied, and the trajectory
    still matches torch.optim.AdamW."""
    from kernels import adamw as adamw_mod

    base = _model_params(kernel_device)
    ref_p, ref = _make(torch.optim.AdamW, base, lr=3e-3, betas=(0.9, 0.95))
    our_p, ours = _make(FusedAdamW, base, lr=3e-3, betas=(0.9, 0.95))

    def one_step(step):
        gen = torch.Generator().manual_seed(step)
        for a, b in zip(ref_p, our_p):
            a.grad = torch.randn(a.shape, generator=gen).to(kernel_device)
            b.grad = a.grad.clone()
        _set_lr(ref, step)
        _set_lr(ours, step)
        ref.step()
        ours.step()

    one_step(0)
    builds, moves = adamw_mod._STATS["builds"], adamw_mod._STATS["grad_moves"]
    plans = list(adamw_mod._PLANS.values())
    tables = [(id(c.table), c.table._version) for plan in plans for c in plan.classes]
    hyper_ids = [id(plan.hyper) for plan in plans]

    calls = []
    real_to, real_copy, real_tensor = torch.Tensor.to, torch.Tensor.copy_, torch.tensor

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return wrapper

    # Grads are written outside the counted region, in place (as backward accumulates into kept grads,
    # or as the caching allocator hands back the same blocks); only the optimizer steps are counted.
    for step in range(1, 5):
        gen = torch.Generator().manual_seed(step)
        for a, b in zip(ref_p, our_p):
            a.grad = torch.randn(a.shape, generator=gen).to(kernel_device)
            b.grad.copy_(a.grad)
        _set_lr(ref, step)
        _set_lr(ours, step)
        ref.step()
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "to", counting("to", real_to))
            m.setattr(torch.Tensor, "copy_", counting("copy_", real_copy))
            m.setattr(torch, "tensor", counting("tensor", real_tensor))
            ours.step()
        assert _max_diff(ref_p, our_p) <= 1e-6, f"step {step}"
    assert calls == [], calls
    assert (adamw_mod._STATS["builds"], adamw_mod._STATS["grad_moves"]) == (builds, moves)  # no rebuild
    plans_now = list(adamw_mod._PLANS.values())
    assert [(id(c.table), c.table._version) for plan in plans_now for c in plan.classes] == tables
    assert [id(plan.hyper) for plan in plans_now] == hyper_ids


def test_tables_rebuilt_when_the_parameter_set_changes(kernel_device):
    """A param without a grad this step changes the set: new tables, and the results stay torch's."""
    from kernels import adamw as adamw_mod

    base = _model_params(kernel_device)[:6]
    ref_p, ref = _make(torch.optim.AdamW, base, lr=1e-2)
    our_p, ours = _make(FusedAdamW, base, lr=1e-2)
    builds = []
    for step in range(6):
        _set_grads(step, [ref_p, our_p], skip_every=3)  # odd steps: every third tensor has no grad
        ref.step()
        ours.step()
        builds.append(adamw_mod._STATS["builds"])
        assert _max_diff(ref_p, our_p) <= 1e-6, f"step {step}"
    # every change of the set rebuilds (the skipped tensors' step counts lag behind after it)
    assert builds[1] > builds[0] and builds[2] > builds[1]


def test_moved_grads_update_only_their_offsets(kernel_device):
    """Fresh grads at new addresses (set_to_none, then a new backward): the tables stay, the grad offsets
    are re-sent, and the update is still torch's."""
    from kernels import adamw as adamw_mod

    base = _model_params(kernel_device)[:6]
    ref_p, ref = _make(torch.optim.AdamW, base, lr=1e-2)
    our_p, ours = _make(FusedAdamW, base, lr=1e-2)
    def set_grads(step):
        gen = torch.Generator().manual_seed(step)
        for a in ref_p:
            a.grad = torch.randn(a.shape, generator=gen).to(kernel_device)
        # allocated last-to-first on odd steps: the grads' layout relative to each other changes
        for a, b in list(zip(ref_p, our_p))[::-1 if step % 2 else 1]:
            b.grad = a.grad.clone()

    set_grads(0)
    ref.step()
    ours.step()
    builds, moves = adamw_mod._STATS["builds"], adamw_mod._STATS["grad_moves"]
    keep = [p.grad for p in our_p]  # the old grads stay alive: the new ones land elsewhere
    for step in range(1, 3):
        set_grads(step)
        ref.step()
        ours.step()
        assert _max_diff(ref_p, our_p) <= 1e-6
    assert adamw_mod._STATS["builds"] == builds and adamw_mod._STATS["grad_moves"] > moves
    del keep


# ------------------------------------------------------------------------------------------------
# Validation as torch.optim.AdamW, before any state changes (issue 15)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("betas", [(0.9, torch.tensor(0.999)), (torch.tensor(0.9), 0.999), (0, 0.99),
                                   (torch.tensor(0.9), torch.tensor(1.5)), (0.9, 1.0), (-0.1, 0.99)],
                         ids=["float-tensor", "tensor-float", "int", "tensor-beta2-1.5", "beta2-1", "beta1-neg"])
def test_betas_refused_as_torch_refuses_them(betas):
    p = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError) as want:
        torch.optim.AdamW([p], betas=betas)
    with pytest.raises(ValueError) as got:
        FusedAdamW([p], betas=betas)
    assert str(got.value) == str(want.value)


def test_tensor_betas_accepted_as_torch_accepts_them(kernel_device):
    base = _model_params(kernel_device)[:4]
    betas = (torch.tensor([0.9]), torch.tensor(0.95))  # 1-element tensors, as torch allows
    ref_p, ref = _make(torch.optim.AdamW, base, lr=1e-2, betas=betas)
    our_p, ours = _make(FusedAdamW, base, lr=1e-2, betas=betas)
    for step in range(2):
        _set_grads(step, [ref_p, our_p])
        ref.step()
        ours.step()
    assert _max_diff(ref_p, our_p) <= 1e-6


@pytest.mark.parametrize("bad", ["fp16", "bf16", "noncontiguous"])
def test_refused_param_leaves_state_untouched(bad, kernel_device):
    """A step that refuses a parameter has not created state nor advanced any step count."""
    good = torch.nn.Parameter(torch.randn(8, 4, device=kernel_device))
    if bad == "noncontiguous":
        other = torch.nn.Parameter(torch.randn(4, 8, device=kernel_device).t())
    else:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[bad]
        other = torch.nn.Parameter(torch.randn(8, device=kernel_device, dtype=dtype))
    opt = FusedAdamW([good, other], lr=1e-2)
    good.grad = torch.randn_like(good)
    opt.step()  # `other` has no grad yet: skipped
    assert opt.state[good]["step"].item() == 1.0 and other not in opt.state
    before = good.detach().clone()
    other.grad = torch.randn_like(other)
    with pytest.raises(ValueError, match="param 1 of group 0"):
        opt.step()
    assert opt.state[good]["step"].item() == 1.0  # not advanced by the refused step
    assert other not in opt.state
    assert torch.equal(good.detach(), before)


def _scaler_run(cls, base, unscale: bool, steps=8, inf_step=3, **kw):
    """`steps` GradScaler steps (scaler.step, optionally after unscale_) with an inf grad at `inf_step`."""
    params, opt = _make(cls, base, lr=3e-3, betas=(0.9, 0.95), **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        for p in params:
            p.grad = scaler.scale(torch.randn(p.shape, generator=gen))
        if step == inf_step:
            params[0].grad.view(-1)[0] = float("inf")
        if unscale:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
    return params, opt


def _assert_same_state(ref_p, ref, our_p, ours):
    assert _max_diff(ref_p, our_p) <= 1e-6
    for p_ref, p_our in zip(ref_p, our_p):
        s_ref, s_our = ref.state[p_ref], ours.state[p_our]
        assert s_our["step"].item() == s_ref["step"].item()
        torch.testing.assert_close(s_our["exp_avg"], s_ref["exp_avg"], atol=1e-6, rtol=0)
        torch.testing.assert_close(s_our["exp_avg_sq"], s_ref["exp_avg_sq"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("unscale", [False, True], ids=["scaler.step", "unscale_+step"])
def test_grad_scaler_skip_matches_torch(unscale, kernel_device, expect_launch):
    """Under torch.amp.GradScaler a step skipped for an inf grad leaves params, moments and the step count
    as torch's AdamW (fused and default) leave them, for every later step too."""
    if kernel_device != "cpu":
        pytest.skip("GradScaler('cpu') drives CPU tensors: the interpreter run")
    base = _model_params("cpu")[:6]
    with expect_launch("adamw"):
        our_p, ours = _scaler_run(FusedAdamW, base, unscale)
    for kw in ({"fused": True}, {}):
        ref_p, ref = _scaler_run(torch.optim.AdamW, base, unscale, **kw)
        assert all(ref.state[p]["step"].item() == 7 for p in ref_p)  # 8 steps, one skipped
        _assert_same_state(ref_p, ref, our_p, ours)


def test_found_inf_and_grad_scale_by_hand_match_torch_fused(kernel_device):
    """found_inf / grad_scale set on the optimizer by hand, as torch's fused AdamW takes them; the trainer's
    undo_step_count() after a skip stays harmless."""
    base = [p.to(kernel_device) for p in _model_params("cpu")[:6]]
    ref_p, ref = _make(torch.optim.AdamW, base, lr=3e-3, fused=True)
    our_p, ours = _make(FusedAdamW, base, lr=3e-3)
    for step in range(6):
        gen = torch.Generator().manual_seed(step)
        for ps in zip(ref_p, our_p):
            g = (torch.randn(ps[0].shape, generator=gen) * 8.0).to(kernel_device)
            for p in ps:
                p.grad = g.clone()
        skipped = step in (1, 2)
        for opt in (ref, ours):
            opt.grad_scale = torch.tensor(8.0, device=kernel_device)
            opt.found_inf = torch.tensor(float(skipped), device=kernel_device)
            opt.step()
            del opt.grad_scale, opt.found_inf
        if step == 2:
            ours.undo_step_count()  # what train.py calls after a skipped step (step 1 goes without it)
        if kernel_device != "cpu":
            ours.state_dict()  # a device flag settles the counts here at the latest (never waited for in step)
        _assert_same_state(ref_p, ref, our_p, ours)
    assert ref.state[ref_p[0]]["step"].item() == 4
