"""``arraysyncbn.torch`` in the training workflows users run, against plain torch.

A small CNN (conv → batch norm → relu) converted with ``convert_sync_batchnorm``
and the same CNN with ``torch.nn.BatchNorm2d``, run through: autocast,
channels_last end to end, gradient accumulation with evaluation and mode
switches in between (frozen, affine-free, cumulative and stat-free layers),
checkpoint and resume, ``torch.compile`` of a training loop, thread ranks
training data-parallel on uneven shards, and the tools that inspect a model
(``torch.fx`` tracing, ``torch.func`` transforms). Each test is small and fast:
``test_torch_module.py`` covers the layer itself in depth.
"""

from __future__ import annotations

import copy
import io
import shutil

import pytest

import arraysyncbn as sbn

torch = pytest.importorskip("torch")
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402

from arraysyncbn.torch import SyncBatchNorm, convert_sync_batchnorm  # noqa: E402


def _cnn(dtype=torch.float32, **bn_kwargs) -> torch.nn.Module:
    """The same small CNN every call (its own generator: thread ranks share torch's)."""
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(4, **bn_kwargs),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 1, bias=False),
        torch.nn.BatchNorm2d(4, **bn_kwargs),
    ).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand(p.shape, generator=gen, dtype=dtype) - 0.25)
    return model


def _batch(step: int, n: int = 4, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 3, 5, 5, generator=gen, dtype=dtype) * 2 + 3


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].detach().double() - b[k].detach().double()).abs().max()) for k in a)


def _bn_layers(model: torch.nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


# -- autocast and memory format ---------------------------------------------------------
def test_autocast_bfloat16_gives_batchnorm2d_dtypes_and_values() -> None:
    """Under CPU autocast the conv hands bfloat16 to float32 batch-norm parameters:
    the output is bfloat16 and the parameter gradients float32, as with BatchNorm2d."""
    x = _batch(0, dtype=torch.float32)
    got = {}
    for name, model in (("torch", _cnn()), ("ours", convert_sync_batchnorm(_cnn()))):
        seen = []
        model[1].register_forward_hook(lambda m, i, o, seen=seen: seen.append((i[0], o)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        y.float().square().mean().backward()
        (bn_in, bn_out) = seen[0]
        assert bn_in.dtype == bn_out.dtype == y.dtype == torch.bfloat16, name
        grads = {n: p.grad for n, p in model.named_parameters()}
        assert all(g.dtype == torch.float32 for g in grads.values()), name
        got[name] = {"y": y.detach(), **grads, **dict(model.named_buffers())}
    for k in got["torch"]:
        assert got["ours"][k].dtype == got["torch"][k].dtype, k
    # The same float32 statistics, rounded once to bfloat16 (2^-8 relative).
    assert _max_diff(got["ours"], got["torch"]) <= 2e-2


def test_channels_last_model_keeps_channels_last_like_batchnorm2d() -> None:
    x = _batch(0).contiguous(memory_format=torch.channels_last).requires_grad_()
    results = []
    for model in (_cnn(torch.float64), convert_sync_batchnorm(_cnn(torch.float64))):
        model = model.to(memory_format=torch.channels_last)
        outs = []
        for layer in model:
            layer.register_forward_hook(lambda m, i, o, outs=outs: outs.append(o))
        x.grad = None
        y = model(x)
        y.square().mean().backward()
        assert all(o.is_contiguous(memory_format=torch.channels_last) for o in outs)
        assert x.grad.is_contiguous(memory_format=torch.channels_last)
        results.append({"y": y, "dx": x.grad.clone(), **model.state_dict()})
    assert _max_diff(*results) <= 1e-13


# -- training loops -----------------------------------------------------------------------
def _accumulate_and_evaluate(model: torch.nn.Module, frozen: bool) -> list[float]:
    """Three optimizer steps of three uneven micro-batches each, with a no_grad
    evaluation and a no_grad training forward between steps."""
    if frozen:
        for bn in _bn_layers(model):
            bn.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    log = []
    for step in range(3):
        for micro in range(3):
            loss = model(_batch(10 * step + micro, n=2 + micro)).square().mean() / 3
            loss.backward()
            log.append(loss.item())
        opt.step()
        opt.zero_grad()
        model.eval()
        with torch.no_grad():
            log.append(model(_batch(99, n=3)).sum().item())
        model.train()
        with torch.no_grad():
            log.append(model(_batch(98, n=2)).sum().item())
    return log


@pytest.mark.parametrize(
    ("bn_kwargs", "frozen"),
    [
        ({}, False),
        ({}, True),
        ({"momentum": None}, False),
        ({"track_running_stats": False}, False),
        ({"affine": False, "momentum": None}, False),
    ],
)
def test_accumulation_evaluation_and_mode_switches_match_batchnorm2d(bn_kwargs, frozen) -> None:
    ref = _cnn(torch.float64, **bn_kwargs)
    ours = convert_sync_batchnorm(_cnn(torch.float64, **bn_kwargs))
    log_ref = _accumulate_and_evaluate(ref, frozen)
    log_ours = _accumulate_and_evaluate(ours, frozen)
    assert max(abs(a - b) for a, b in zip(log_ref, log_ours, strict=True)) <= 1e-12
    assert _max_diff(ref.state_dict(), ours.state_dict()) <= 1e-13


def _sgd_steps(model, opt, steps) -> list[float]:
    losses = []
    for step in steps:
        loss = model(_batch(step)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_checkpoint_and_resume_continue_the_uninterrupted_run() -> None:
    """Resuming from a state dict matches the uninterrupted run to rounding, not
    bit for bit: the merge center (the last reduced mean) is not part of the
    state dict, which must load into BatchNorm2d strictly, so the first step
    after loading merges its statistics around zero instead (docs/numerics.md)."""

    def fresh():
        model = convert_sync_batchnorm(_cnn(torch.float64, momentum=None))
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    model, opt = fresh()
    uninterrupted = _sgd_steps(model, opt, range(6))

    model, opt = fresh()
    first = _sgd_steps(model, opt, range(3))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    model, opt = fresh()
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    resumed = first + _sgd_steps(model, opt, range(3, 6))
    assert resumed[:3] == uninterrupted[:3]
    assert max(abs(a - b) for a, b in zip(resumed, uninterrupted, strict=True)) <= 1e-14
    # And a BatchNorm2d checkpoint resumes in the converted model like in torch.
    ref = _cnn(torch.float64, momentum=None)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    _sgd_steps(ref, ref_opt, range(3))
    model, opt = fresh()
    model.load_state_dict(ref.state_dict())
    opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # else momenta are shared
    got = _sgd_steps(model, opt, range(3, 6))
    want = _sgd_steps(ref, ref_opt, range(3, 6))
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-13


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_training_loop_matches_eager(compiler) -> None:
    if compiler == "inductor" and shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("inductor needs a C++ compiler on the CPU")
    eager = convert_sync_batchnorm(_cnn(torch.float64))
    model = convert_sync_batchnorm(_cnn(torch.float64))
    compiled = torch.compile(model, backend=compiler)
    logs = []
    for m, call in ((eager, eager), (model, compiled)):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        log = []
        for step in range(3):
            m.train()
            log += _sgd_steps(call, opt, [step])
            m.eval()
            with torch.no_grad():
                log.append(call(_batch(50 + step)).sum().item())
        logs.append(log)
    assert max(abs(a - b) for a, b in zip(*logs, strict=True)) <= 1e-12
    assert _max_diff(eager.state_dict(), model.state_dict()) <= 1e-13


@pytest.mark.parametrize("channels_last", [False, True])
def test_thread_ranks_train_like_one_batchnorm2d_on_the_whole_batch(channels_last) -> None:
    """Four ranks (one with an empty shard) train data-parallel, summing their
    gradients through the communicator: the same losses and state as one
    BatchNorm2d model on the concatenated batch, the same bits on every rank."""
    sizes = [3, 0, 1, 4]
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def train(model, shard_of, allreduce):
        model = model.to(memory_format=fmt)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        log = []
        for step in range(3):
            x = _batch(step, n=sum(sizes)).contiguous(memory_format=fmt)
            loss = model(shard_of(x)).square().sum() / x.numel()
            opt.zero_grad()
            loss.backward()
            grads = allreduce(torch.cat([p.grad.flatten() for p in model.parameters()]))
            torch.nn.utils.vector_to_parameters(grads, [p.grad for p in model.parameters()])
            opt.step()
            log.append(float(allreduce(loss.detach().reshape(1))[0]))
            model.eval()
            with torch.no_grad():  # evaluation on each rank alone (no collective)
                log.append(model(x[:2]).sum().item())
            model.train()
        return log, model.state_dict()

    want_log, want_state = train(_cnn(torch.float64), lambda x: x, lambda t: t)
    comms = sbn.thread_group(len(sizes), timeout=60)
    # Built here, not in the ranks' threads: there they would share torch's generator.
    models = [convert_sync_batchnorm(_cnn(torch.float64), comm) for comm in comms]

    def rank(comm):
        return train(models[comm.rank], lambda x: torch.split(x, sizes)[comm.rank], comm.allreduce)

    results = sbn.run_ranks(rank, comms)
    for log, state in results:
        assert max(abs(a - b) for a, b in zip(log, want_log, strict=True)) <= 1e-12
        assert _max_diff(state, want_state) <= 1e-13
        assert all(torch.equal(state[k], results[0][1][k]) for k in state)


# -- tools that inspect a model -----------------------------------------------------------
def test_torch_fx_traces_the_layer_as_a_leaf_like_torch_batch_norm() -> None:
    """``torch.fx.symbolic_trace`` (torchvision's feature extraction, FX passes)
    failed with "symbolically traced variables cannot be used as inputs to
    control flow"; torch's batch norm layers are leaves of the traced graph."""
    model = convert_sync_batchnorm(_cnn(torch.float64))
    traced = torch.fx.symbolic_trace(model)
    called = [n.target for n in traced.graph.nodes if n.op == "call_module"]
    assert called == ["0", "1", "2", "3", "4"]
    assert isinstance(traced.get_submodule("1"), SyncBatchNorm)
    reference = _cnn(torch.float64)
    x = _batch(0)
    assert torch.allclose(traced(x), reference(x), rtol=0, atol=1e-13)
    assert _max_diff(model.state_dict(), reference.state_dict()) <= 1e-14  # stats updated
    with pytest.raises(RuntimeError, match="trace that model, not the layer alone"):
        torch.fx.symbolic_trace(SyncBatchNorm(3))  # was: "object has no attribute ''"


def test_torch_func_transforms_run_eval_mode_and_refuse_training_clearly() -> None:
    """``torch.vmap`` of a model in eval mode (ensembles, per-sample outputs) raised
    torch's "must override the setup_context staticmethod", about this
    package's internals; eval mode never communicates, so it now runs as
    plain torch batch norm, and training mode says what to do instead."""
    model = convert_sync_batchnorm(_cnn(torch.float64)).eval()
    reference = _cnn(torch.float64).eval()
    xs = torch.stack([_batch(0), _batch(1)])
    assert torch.allclose(torch.vmap(model)(xs), torch.vmap(reference)(xs), rtol=0, atol=1e-13)
    model.train()
    with pytest.raises(RuntimeError, match=r"torch\.func transforms .* revert_sync_batchnorm"):
        torch.vmap(model)(xs)


def test_sparse_input_is_a_clear_error() -> None:
    bn = SyncBatchNorm(3)
    with pytest.raises(TypeError, match="dense"):
        bn(torch.randn(4, 3, 2).to_sparse())
