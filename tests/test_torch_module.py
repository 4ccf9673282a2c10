"""``arraysyncbn.torch``: the PyTorch module against ``torch.nn.BatchNorm2d``.

One rank and thread ranks with uneven shards against BatchNorm2d on the
concatenated batch (outputs, input gradients per shard, weight and bias
gradients summed over ranks, running statistics, ``num_batches_tracked``),
gradcheck, half precision, state dicts both ways, convert/revert,
torch.compile, and the ``torch.distributed`` communicator in one process.
Multi-process jobs (torchrun + DDP, mpiexec + MPICommunicator) are in
``test_torch_distributed.py``.
"""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest

import arraysyncbn as sbn

torch = pytest.importorskip("torch")
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402

from arraysyncbn.torch import (  # noqa: E402
    BatchNormXd,
    SyncBatchNorm,
    convert_sync_batchnorm,
    revert_sync_batchnorm,
)

C = 3
# float32 outputs and input gradients agree with torch's within a few ulps of
# the normalized values (|x̂| ≲ 4); weight/bias gradients are sums over the
# batch, so their bound grows with the batch (≲ 200 elements here).
TOL = {torch.float32: 5e-6, torch.float64: 1e-12}
SUM_TOL = {torch.float32: 2e-4, torch.float64: 1e-10}


# CPU always; CUDA where a GPU is (marked gpu, so scripts/gpu_check.sh runs it).
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=(
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ),
    ),
]


def _close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    got, want = got.detach(), want.detach()
    assert got.dtype == want.dtype, (what, got.dtype, want.dtype)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = float((got.double() - want.double()).abs().max()) if got.numel() else 0.0
    assert err <= tol, f"{what}: max error {err:.3e} > {tol:.1e}"


def _pair(dtype=torch.float32, **kwargs):
    """Ours and BatchNorm2d with the same (non-trivial) parameters and buffers."""
    gen = torch.Generator().manual_seed(1)
    ref = torch.nn.BatchNorm2d(C, dtype=dtype, **kwargs)
    ours = SyncBatchNorm(C, dtype=dtype, **kwargs)
    with torch.no_grad():
        if ref.affine:
            ref.weight.copy_(torch.rand(C, generator=gen, dtype=dtype) + 0.5)
            ref.bias.copy_(torch.randn(C, generator=gen, dtype=dtype))
        if ref.track_running_stats:
            ref.running_mean.copy_(torch.randn(C, generator=gen, dtype=dtype))
            ref.running_var.copy_(torch.rand(C, generator=gen, dtype=dtype) + 0.5)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _grads(module, x, dy):
    x = x.detach().requires_grad_(True)
    y = module(x)
    params = [p for p in (module.weight, module.bias) if p is not None]
    grads = torch.autograd.grad(y, [x, *params], dy)
    return y.detach(), grads


# -- one rank -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("channels_last", [False, True])
def test_one_rank_matches_batchnorm2d(dtype, momentum, channels_last) -> None:
    ours, ref = _pair(dtype, momentum=momentum)
    assert isinstance(ours, _BatchNorm)
    gen = torch.Generator().manual_seed(2)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for step in range(3):
        x = (torch.randn(4, C, 5, 6, generator=gen, dtype=dtype) * 2 + step).contiguous(
            memory_format=fmt
        )
        dy = torch.randn(x.shape, generator=gen, dtype=dtype)
        y, g = _grads(ours, x, dy)
        y_ref, g_ref = _grads(ref, x, dy)
        assert y.is_contiguous(memory_format=fmt)
        _close(y, y_ref, TOL[dtype], "y")
        _close(g[0], g_ref[0], TOL[dtype] * 10, "dx")
        _close(g[1], g_ref[1], SUM_TOL[dtype], "dweight")
        _close(g[2], g_ref[2], SUM_TOL[dtype], "dbias")
        _close(ours.running_mean, ref.running_mean, TOL[dtype], "running_mean")
        _close(ours.running_var, ref.running_var, TOL[dtype], "running_var")
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == step + 1
    ours.eval()
    ref.eval()
    y, g = _grads(ours, x, dy)
    y_ref, g_ref = _grads(ref, x, dy)
    _close(y, y_ref, TOL[dtype], "eval y")
    for a, b, what in zip(g, g_ref, ("dx", "dweight", "dbias"), strict=True):
        _close(a, b, SUM_TOL[dtype], f"eval {what}")
    assert int(ours.num_batches_tracked) == 3


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("shape", [(6, C), (2, C, 7), (2, C, 2, 3, 2)])
def test_configurations_and_ranks_match_torch(affine, track, shape) -> None:
    ours, ref = _pair(torch.float64, affine=affine, track_running_stats=track)
    ref = BatchNormXd(C, affine=affine, track_running_stats=track, dtype=torch.float64)
    ref.load_state_dict(ours.state_dict())
    gen = torch.Generator().manual_seed(3)
    for mode in ("train", "eval"):
        ours.train(mode == "train")
        ref.train(mode == "train")
        x = torch.randn(shape, generator=gen, dtype=torch.float64) + 1
        dy = torch.randn(shape, generator=gen, dtype=torch.float64)
        y, g = _grads(ours, x, dy)
        y_ref, g_ref = _grads(ref, x, dy)
        _close(y, y_ref, 1e-12, f"{mode} y")
        for a, b in zip(g, g_ref, strict=True):
            _close(a, b, 1e-10, f"{mode} grad")
        assert sorted(ours.state_dict()) == sorted(ref.state_dict())
        for key, value in ref.state_dict().items():
            _close(ours.state_dict()[key], value, 1e-12, key)


def test_gradients_only_where_asked_and_odd_dy() -> None:
    ours, ref = _pair()
    x = torch.randn(3, C, 4, 4)
    # x needs no gradient (a first layer); the parameters do.
    y = ours(x)
    y.sum().backward()  # dy: an expanded tensor with zero strides
    assert ours.weight.grad is not None and ours.bias.grad is not None
    ref(x).sum().backward()
    _close(ours.weight.grad, ref.weight.grad, SUM_TOL[torch.float32], "dweight")
    _close(ours.bias.grad, ref.bias.grad, SUM_TOL[torch.float32], "dbias")
    # A non-contiguous dy (through a transpose) and frozen parameters.
    ours.weight.requires_grad_(False)
    ref.weight.requires_grad_(False)
    xg = x.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    (ours(xg).transpose(2, 3) * torch.arange(4.0)).sum().backward()
    (ref(xr).transpose(2, 3) * torch.arange(4.0)).sum().backward()
    _close(xg.grad, xr.grad, 1e-5, "dx for a transposed dy")


def test_parametrized_weight_and_bias_match_batchnorm2d() -> None:
    """torch.nn.utils.parametrize turns a parameter into a property (the
    module's dict no longer holds it): the layer reads it through that
    property, and gradients reach the original tensors as torch's do."""
    parametrize = torch.nn.utils.parametrize

    class Positive(torch.nn.Module):
        def forward(self, w):
            return w.abs() + 0.5

    class Doubled(torch.nn.Module):
        def forward(self, b):
            return 2.0 * b

    ours, ref = _pair(torch.float64)
    for module in (ours, ref):
        parametrize.register_parametrization(module, "weight", Positive())
        parametrize.register_parametrization(module, "bias", Doubled())
    x = torch.randn(5, C, 3, 4, dtype=torch.float64)
    dy = torch.randn(5, C, 3, 4, dtype=torch.float64)
    results = []
    for module in (ours, ref):
        xg = x.clone().requires_grad_(True)
        y = module(xg)
        originals = [module.parametrizations[n].original for n in ("weight", "bias")]
        results.append((y, torch.autograd.grad(y, [xg, *originals], dy)))
    (y, got), (y_ref, want) = results
    _close(y, y_ref, TOL[torch.float64], "y")
    for g, w, what in zip(got, want, ("dx", "dweight", "dbias"), strict=True):
        assert float(w.abs().max()) > 0.1, what  # a gradient that can tell them apart
        _close(g, w, SUM_TOL[torch.float64], what)
    _close(ours.running_mean, ref.running_mean, TOL[torch.float64], "running_mean")
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 1


def test_a_subclass_property_over_a_registered_parameter_is_used() -> None:
    """A subclass that defines ``weight`` as a property, with the parameter
    still registered under that name: the layer uses the property, as
    nn.Module's attribute lookup does."""

    class Scaled(SyncBatchNorm):
        @property
        def weight(self):
            return 2.0 * self._parameters["weight"]

    layer = SyncBatchNorm(C)
    layer.__class__ = Scaled  # nn.Module refuses to register a name the class defines
    x = torch.randn(6, C, 4, dtype=torch.float32)
    y = layer(x)
    _close(y.std(dim=(0, 2), unbiased=False), torch.full((C,), 2.0), 1e-4, "std of y")


def test_no_grad_and_inference_mode_update_running_statistics() -> None:
    ours, ref = _pair()
    x = torch.randn(4, C, 3, 3)
    with torch.no_grad():
        y = ours(x.requires_grad_(True))
    assert not y.requires_grad
    with torch.inference_mode():
        y = ours(x)
        y_ref = ref(x)
        ref(x)
    _close(y, y_ref, TOL[torch.float32], "inference y")
    _close(ours.running_mean, ref.running_mean, TOL[torch.float32], "running_mean")
    assert int(ours.num_batches_tracked) == 2


def _count_inference_calls(monkeypatch) -> list[int]:
    """A list that grows by one at each call of functional.batch_norm_inference."""
    calls: list[int] = []
    inference = sbn.functional.batch_norm_inference

    def counted(*args, **kwargs):
        calls.append(1)
        return inference(*args, **kwargs)

    monkeypatch.setattr(sbn.functional, "batch_norm_inference", counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("how", ["no_grad", "inference_mode", "frozen", "threads"])
def test_eval_without_autograd_takes_the_inference_kernel(
    dtype, channels_last, how, monkeypatch
) -> None:
    """Eval with nothing to differentiate runs batch_norm_inference on numpy
    views (one kernel, little Python): the bits of the full step (run with
    x requiring grad), BatchNorm2d's values, a tensor like x, and nothing
    written to the buffers."""
    monkeypatch.delenv("ARRAYSYNCBN_FAST", raising=False)
    calls = _count_inference_calls(monkeypatch)
    ours, ref = _pair(dtype)
    ours.eval(), ref.eval()
    shape = (64, C, 40, 40) if how == "threads" else (4, C, 5, 6)  # above 512 KiB: threaded
    x = torch.randn(shape, dtype=dtype) * 3 + 20
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    full = ours(x.detach().requires_grad_(True)).detach()
    assert not calls
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    if how == "frozen":
        ours.requires_grad_(False)
        y = ours(x)
    elif how == "inference_mode":
        with torch.inference_mode():
            y = ours(x)
    else:
        with torch.no_grad():
            y = ours(x)
    assert calls == [1]
    assert not y.requires_grad and y.dtype == dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    bits = {torch.float32: torch.int32, torch.float64: torch.int64}[dtype]
    assert torch.equal(y.view(bits), full.view(bits))
    with torch.no_grad():
        _close(y, ref(x), TOL[dtype] * 4, "eval y")
    for k, v in ours.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("params", ["float32", "half"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_half_precision_eval_takes_the_inference_kernel_too(
    dtype, params, channels_last, monkeypatch
) -> None:
    """Half-precision eval without autograd: batch_norm_inference on the
    tensors (its host path takes their 16-bit views), the full step's bits,
    torch's values."""
    monkeypatch.delenv("ARRAYSYNCBN_FAST", raising=False)
    calls = _count_inference_calls(monkeypatch)
    ours, ref = _pair()
    ours.eval(), ref.eval()
    if params == "half":
        ours.to(dtype), ref.to(dtype)
    x = (torch.randn(4, C, 5, 6) * 3 + 20).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    full = ours(x.detach().requires_grad_(True)).detach()
    assert not calls
    with torch.no_grad():
        y = ours(x)
        # torch refuses half input with float32 parameters on CPU: its float32 result
        y_ref = ref(x) if params == "half" else ref(x.float())
    assert calls == [1]
    assert y.dtype == dtype and y.stride() == full.stride()
    assert torch.equal(y.view(torch.int16), full.view(torch.int16))
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=4 * eps, atol=4 * eps)


def test_eval_without_running_statistics_keeps_the_full_step(monkeypatch) -> None:
    """No running statistics (batch statistics in eval) keep the full step;
    the portable route (ARRAYSYNCBN_FAST=0) goes through batch_norm_inference
    to the full forward, with torch's values."""
    calls = _count_inference_calls(monkeypatch)
    x = torch.randn(4, C, 5, 6)
    with torch.no_grad():
        SyncBatchNorm(C, track_running_stats=False).eval()(x)
        assert not calls
        monkeypatch.setenv("ARRAYSYNCBN_FAST", "0")
        ours, ref = _pair()
        _close(ours.eval()(x), ref.eval()(x), TOL[torch.float32], "portable eval y")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eval_input_gradient_ignores_non_finite_inputs_like_batchnorm2d(dtype) -> None:
    """A frozen layer's input gradient is weight·invstd·dy whatever x holds:
    an infinite x gave NaN in x.grad (BatchNorm2d: finite)."""
    ours, ref = _pair()
    ours.eval().to(dtype), ref.eval().to(dtype)
    x = torch.randn(4, C, 3, 3).to(dtype)
    x[0, 0, 0, 0], x[1, 2, 1, 1], x[2, 1, 0, 2] = float("inf"), float("-inf"), float("nan")
    dy = torch.randn(4, C, 3, 3).to(dtype)
    (_, (dx, *_)), (_, (dx_ref, *_)) = _grads(ours, x, dy), _grads(ref, x, dy)
    assert torch.isfinite(dx).all()
    ulps = 2 * torch.finfo(dtype).eps  # both round a float32 product, scales computed apart
    torch.testing.assert_close(dx.float(), dx_ref.float(), rtol=ulps, atol=0)


@pytest.mark.parametrize("route", ["numpy views", "bfloat16 tensors", "portable"])
def test_the_graph_does_not_keep_the_input_alive_after_backward(route, monkeypatch) -> None:
    """As torch's own layers: x is freed after the backward although the
    graph (held through the loss, e.g. ``total += loss``) lives on; kept
    with retain_graph, whose second backward gives the same gradients. The
    layer's record on the autograd node used to hold x until the graph died."""
    import gc
    import weakref

    if route == "portable":
        monkeypatch.setenv("ARRAYSYNCBN_FAST", "0")
    dtype = torch.bfloat16 if route == "bfloat16 tensors" else torch.float32

    def probe(module, retain):
        """Whether x is alive after the backward (and, with retain_graph,
        after the second backward, which frees it)."""
        buf = np.random.default_rng(0).standard_normal((4, C, 5, 5)).astype(np.float32)
        if dtype == torch.bfloat16:  # its bit patterns, in memory numpy owns
            buf = torch.from_numpy(buf).to(dtype).view(torch.int16).numpy().copy()
        x = torch.from_numpy(buf).view(dtype)
        alive = weakref.ref(buf)  # x's memory: freed with the last tensor on it
        del buf
        loss = module(x).float().square().sum()
        del x
        loss.backward(retain_graph=retain)
        gc.collect()
        kept = [alive() is not None]
        if retain:
            grads = [p.grad.clone() for p in module.parameters()]
            loss.backward()
            for g, h in zip(grads, module.parameters(), strict=True):
                torch.testing.assert_close(h.grad, 2 * g)
            gc.collect()
            kept.append(alive() is not None)
        assert loss.grad_fn is not None  # the graph itself lives on
        return kept

    for retain in (False, True):
        ours, ref = _pair()
        ours.to(dtype), ref.to(dtype)
        want = [True, False] if retain else [False]
        assert probe(ref, retain) == want  # torch's own layer, for the record
        assert probe(ours, retain) == want


def test_saved_tensor_hooks_see_the_input(monkeypatch) -> None:
    """x goes through autograd's saved-tensor machinery, so hooks such as
    save_on_cpu (which hand back a copy) work, with the same gradients."""
    ours, _ = _pair()
    x, dy = torch.randn(4, C, 5, 5), torch.randn(4, C, 5, 5)
    _, want = _grads(ours, x, dy)
    with torch.autograd.graph.save_on_cpu():
        _, got = _grads(ours, x, dy)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


_LAYOUTS = {
    "contiguous": lambda: torch.randn(4, C, 5, 6),
    "channels_last": lambda: torch.randn(4, C, 5, 6).contiguous(memory_format=torch.channels_last),
    # torch's rule for these depends on the sizes: channels-last, then contiguous
    "channels_last, sliced": lambda: torch.randn(2, 4, 5, C).permute(0, 3, 1, 2)[:, :, ::2],
    "channels_last, sliced, C = H": lambda: torch.randn(4, 5, 6, C).permute(0, 3, 1, 2)[:, :, ::2],
    "H and W transposed": lambda: torch.randn(4, C, 5, 6).transpose(2, 3),
    "(N, L, C) transposed": lambda: torch.randn(4, 7, C).transpose(1, 2),
    "2-D transposed": lambda: torch.randn(C, 6).t(),
    "channels_last_3d": lambda: torch.randn(2, C, 3, 4, 5).contiguous(
        memory_format=torch.channels_last_3d
    ),
}


@pytest.mark.parametrize("layout", list(_LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_output_has_torch_batch_norm_memory_layout(layout, dtype, training) -> None:
    """The output's strides are those of torch's batch norm (channels-last
    kept, everything else contiguous), so code that views the output as
    torch allows keeps working: a transposed input used to give a transposed
    output, whose .view(N, -1) raised."""
    x = _LAYOUTS[layout]().to(dtype)
    kind = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}
    ref = kind.get(x.dim(), torch.nn.BatchNorm3d)(C).to(dtype).train(training)
    ours = SyncBatchNorm(C).to(dtype).train(training)
    y, y_ref = ours(x), ref(x)
    assert y.stride() == y_ref.stride(), (y.stride(), y_ref.stride())
    if y_ref.is_contiguous():
        y.view(x.shape[0], -1)  # as torch's output allows
    torch.testing.assert_close(
        y.float(), y_ref.float(), rtol=0, atol=3e-2 if dtype == torch.bfloat16 else 2e-5
    )


def test_training_counts_num_batches_tracked_in_place_with_a_version_bump() -> None:
    """The count is written through its numpy view: still in place (the same
    tensor), and bumped in torch's version counter as add_ would."""
    ours, ref = _pair()
    tracked = ours.num_batches_tracked
    version = tracked._version
    for _ in range(3):
        x = torch.randn(4, C, 3, 3)
        ours(x)
        ref(x)
    assert ours.num_batches_tracked is tracked
    assert int(tracked) == int(ref.num_batches_tracked) == 3
    assert tracked._version >= version + 3
    _close(ours.running_var, ref.running_var, TOL[torch.float32], "running_var")


@pytest.mark.parametrize("momentum", [0.1, None])
def test_num_batches_tracked_set_to_none_trains_as_torch_does(momentum) -> None:
    """torch lets num_batches_tracked be None (not counted; with momentum None
    its running statistics then stay put); ours raised midway through a
    step, after writing the running statistics."""
    ours, ref = _pair(momentum=momentum)
    ours.num_batches_tracked = ref.num_batches_tracked = None
    for _ in range(2):
        x = torch.randn(4, C, 3, 3)
        _close(ours(x), ref(x), TOL[torch.float32], "y")
    assert ours.num_batches_tracked is None
    _close(ours.running_mean, ref.running_mean, TOL[torch.float32], "running_mean")
    _close(ours.running_var, ref.running_var, TOL[torch.float32], "running_var")


@pytest.mark.parametrize(
    "change",
    ["track_running_stats=False", "buffers None", "buffers None, tracking"],
)
def test_running_statistics_changed_after_construction_act_as_in_torch(change) -> None:
    """torch decides by the buffers, not the flag, in eval: a layer whose
    track_running_stats is turned off after training still evaluates with
    its running statistics; with the buffers set to None (as test-time
    adaptation code does) it uses the batch's, in training too, and counts
    num_batches_tracked if it is still tracking. Ours used the batch's
    statistics for the first, and crashed on the last."""
    ours, ref = _pair()
    x0 = torch.randn(4, C, 3, 3)
    for layer in (ours, ref):
        layer(x0)  # running statistics of its own
        if change == "track_running_stats=False":
            layer.track_running_stats = False
        else:
            layer.running_mean = layer.running_var = None
            layer.track_running_stats = change.endswith("tracking")
    x = torch.randn(5, C, 2, 2) * 3 + 1
    for training in (True, False, True):
        ours.train(training)
        ref.train(training)
        _close(ours(x), ref(x), TOL[torch.float32], f"y, training={training}")
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)
    if ref.running_mean is not None:
        _close(ours.running_mean, ref.running_mean, TOL[torch.float32], "running_mean")
    ours.eval()
    ref.eval()
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    _close(compiled(x), ref(x), TOL[torch.float32], "compiled eval y")
    torch._dynamo.reset()


def test_buffers_made_under_inference_mode_refuse_training_before_any_write() -> None:
    """As torch's batch norm: in-place writes to inference tensors outside
    inference mode raise. Ours writes through numpy views, which torch does
    not police, so the layer checks, and writes nothing before raising."""
    with torch.inference_mode():
        ours, ref = _pair()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    x = torch.randn(4, C, 3, 3)
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor"):
        ref(x)
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor"):
        ours(x)
    for name, value in ours.state_dict().items():
        assert torch.equal(value, before[name]), name
    with torch.inference_mode():  # inside, both train
        _close(ours(x), ref(x), TOL[torch.float32], "y in inference mode")
    _close(ours.running_mean, ref.running_mean, TOL[torch.float32], "running_mean")
    assert int(ours.num_batches_tracked) == 1


def test_a_negative_bit_input_trains_like_its_values() -> None:
    """The layer's numpy views refuse a tensor with the negative bit (numpy
    cannot see it): the step then runs on the tensors, with the same values."""
    ours, ref = _pair()
    base = torch.randn(4, C, 5, 2)
    x = torch.complex(torch.zeros_like(base), base).conj().imag  # -base, neg bit set
    assert x.is_neg()
    x.requires_grad_(True)
    plain = (-base).requires_grad_(True)
    y, y_ref = ours(x), ref(plain)
    _close(y, y_ref, TOL[torch.float32], "y")
    dy = torch.randn_like(base)
    y.backward(dy)
    y_ref.backward(dy)
    _close(x.grad, plain.grad, TOL[torch.float32], "dx")
    _close(ours.running_mean, ref.running_mean, TOL[torch.float32], "running_mean")


def test_clear_errors() -> None:
    bn = SyncBatchNorm(C)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        bn(torch.randn(C))
    with pytest.raises(ValueError, match="expected 3 channels"):
        bn(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        SyncBatchNorm(0)
    with pytest.raises(ValueError, match="momentum"):
        SyncBatchNorm(C, momentum=2.0)
    with pytest.raises(TypeError, match="process_group or comm"):
        SyncBatchNorm(C, process_group=object(), comm=sbn.SelfCommunicator())
    with pytest.raises(TypeError, match="Communicator protocol"):
        SyncBatchNorm(C, comm=object())
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(torch.randn(1, C))


def test_double_backward_raises_a_clear_error() -> None:
    bn = SyncBatchNorm(C, dtype=torch.float64)
    x = torch.randn(4, C, 3, dtype=torch.float64, requires_grad=True)
    y = bn(x)
    (dx,) = torch.autograd.grad((y**3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        dx.sum().backward()
    # create_graph alone is fine as long as nothing differentiates twice.
    (dx,) = torch.autograd.grad(bn(x).pow(2).sum(), x, create_graph=True)
    assert dx.shape == x.shape


# -- gradcheck ----------------------------------------------------------------------
def _call(module, x, w, b):
    """``module(x)`` with weight and bias replaced by ``w``, ``b`` (gradcheck inputs)."""
    return torch.func.functional_call(module, {"weight": w, "bias": b}, (x,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_one_rank(training, channels_last, device) -> None:
    gen = torch.Generator().manual_seed(4)
    bn = SyncBatchNorm(C, dtype=torch.float64, device=device).train(training)
    bn.running_var.fill_(0.7)
    x = (torch.randn(3, C, 2, 3, generator=gen, dtype=torch.float64) * 2 + 1).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).to(device)
    b = torch.randn(C, generator=gen, dtype=torch.float64).to(device)
    inputs = tuple(t.requires_grad_(True) for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: _call(bn, x, w, b), inputs)


class _ThreadRanks(torch.autograd.Function):
    """x's shards through thread-rank modules; the backward runs in the rank threads
    too (each rank's backward allreduces with the others)."""

    @staticmethod
    def forward(ctx, x, w, b, modules, sizes):
        shards = torch.split(x.detach(), sizes)
        comms = sbn.thread_group(len(sizes))
        for m, k in zip(modules, comms, strict=True):
            m.comm = k

        def rank(comm):
            with torch.enable_grad():
                leaves = [shards[comm.rank].clone(), w.detach().clone(), b.detach().clone()]
                leaves = [t.requires_grad_(True) for t in leaves]
                return leaves, _call(modules[comm.rank], *leaves)

        ctx.ranks, ctx.comms, ctx.sizes = sbn.run_ranks(rank, comms), comms, sizes
        return torch.cat([y.detach() for _, y in ctx.ranks])

    @staticmethod
    def backward(ctx, dy):
        dys = torch.split(dy, ctx.sizes)

        def rank(comm):
            leaves, y = ctx.ranks[comm.rank]
            return torch.autograd.grad(y, leaves, dys[comm.rank], retain_graph=True)

        grads = sbn.run_ranks(rank, ctx.comms)
        dx = torch.cat([g[0] for g in grads])
        return dx, sum(g[1] for g in grads), sum(g[2] for g in grads), None, None


@pytest.mark.parametrize("sizes", [[2, 3, 0], [1, 1, 3]])
def test_gradcheck_three_thread_ranks_uneven_shards(sizes) -> None:
    """CPU only: torch's autograd runs every thread's CUDA backward on one worker
    thread, so thread ranks cannot train on CUDA tensors (the next test)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(sum(sizes), C, 2, generator=gen, dtype=torch.float64) + 1
    w = torch.rand(C, generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(C, generator=gen, dtype=torch.float64)
    modules = [SyncBatchNorm(C, dtype=torch.float64) for _ in sizes]
    inputs = tuple(t.requires_grad_(True) for t in (x, w, b))
    assert torch.autograd.gradcheck(
        lambda x, w, b: _ThreadRanks.apply(x, w, b, modules, sizes), inputs
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_thread_ranks_training_on_cuda_tensors_raise_instead_of_deadlocking() -> None:
    """Autograd would run both ranks' backward on CUDA's one engine thread, the
    first waiting in the allreduce for the second forever: every rank raises at
    the forward instead. Without autograd (no_grad, eval) thread ranks still work."""
    modules = [SyncBatchNorm(C).cuda() for _ in range(2)]
    comms = sbn.thread_group(2, timeout=30)
    for m, k in zip(modules, comms, strict=True):
        m.comm = k
    xs = [torch.randn(3, C, 2, 2, device="cuda") + r for r in range(2)]

    def train(comm):
        return modules[comm.rank](xs[comm.rank])

    with pytest.raises(RuntimeError, match="one worker thread"):
        sbn.run_ranks(train, comms)

    def no_grad(comm):
        with torch.no_grad():
            return modules[comm.rank](xs[comm.rank])

    comms = sbn.thread_group(2, timeout=30)
    for m, k in zip(modules, comms, strict=True):
        m.comm = k
    ys = sbn.run_ranks(no_grad, comms)
    want = torch.nn.functional.batch_norm(torch.cat(xs), None, None, training=True)
    _close(torch.cat(ys), want, 1e-5, "y")


# -- thread ranks -------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sizes", [(3, 0, 2), (1, 4, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_thread_ranks_match_batchnorm2d_on_the_concatenated_batch(
    dtype, sizes, channels_last
) -> None:
    ref = _pair(dtype, momentum=None)[1]
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    modules = [SyncBatchNorm(C, dtype=dtype, momentum=None) for _ in sizes]
    comms = sbn.thread_group(len(sizes))
    for m, k in zip(modules, comms, strict=True):
        m.load_state_dict(state)
        m.comm = k
    gen = torch.Generator().manual_seed(6)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for step in range(3):
        x = torch.randn(sum(sizes), C, 3, 4, generator=gen, dtype=dtype) * 3 + step
        dy = torch.randn(x.shape, generator=gen, dtype=dtype)
        xs = [s.contiguous(memory_format=fmt) for s in torch.split(x, sizes)]
        dys = torch.split(dy, sizes)

        def rank(comm, xs=xs, dys=dys):
            return _grads(modules[comm.rank], xs[comm.rank], dys[comm.rank])

        results = sbn.run_ranks(rank, comms)
        y_ref, g_ref = _grads(ref, x, dy)
        _close(torch.cat([r[0] for r in results]), y_ref, TOL[dtype], "y")
        for (_, g), want in zip(results, torch.split(g_ref[0], sizes), strict=True):
            _close(g[0], want, TOL[dtype] * 10, "dx of a shard")
        _close(sum(r[1][1] for r in results), g_ref[1], SUM_TOL[dtype], "summed dweight")
        _close(sum(r[1][2] for r in results), g_ref[2], SUM_TOL[dtype], "summed dbias")
        for m in modules:
            _close(m.running_mean, ref.running_mean, TOL[dtype], "running_mean")
            _close(m.running_var, ref.running_var, TOL[dtype], "running_var")
            # Every rank holds the same bits.
            assert torch.equal(m.running_mean, modules[0].running_mean)
            assert torch.equal(m.running_var, modules[0].running_var)
            assert int(m.num_batches_tracked) == step + 1


def test_eval_without_running_stats_uses_the_local_batch_and_never_waits() -> None:
    """As torch.nn.SyncBatchNorm: eval mode does not communicate, so one rank alone may run it."""
    comms = sbn.thread_group(2, timeout=5)
    bn = SyncBatchNorm(C, track_running_stats=False, comm=comms[0]).eval()
    x = torch.randn(4, C, 3)
    _close(bn(x), BatchNormXd(C, track_running_stats=False).eval()(x), 1e-5, "local y")


def test_ranks_that_disagree_raise_on_every_rank() -> None:
    comms = sbn.thread_group(2)
    modules = [SyncBatchNorm(C, eps=1e-5 * (1 + k.rank), comm=k) for k in comms]
    x = torch.randn(2, C, 3)

    def rank(comm):
        with pytest.raises(sbn.CollectiveMismatchError, match="eps differs"):
            modules[comm.rank](x)
        return True

    assert sbn.run_ranks(rank, comms) == [True, True]


def test_merge_center_follows_statistics_and_communicator() -> None:
    bn = SyncBatchNorm(C, dtype=torch.float64)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(4, C, 5, generator=gen, dtype=torch.float64) + 1e7
    with warnings.catch_warnings():
        warnings.simplefilter("error", sbn.PrecisionWarning)  # the second pass repairs it
        bn(x)
    assert bn._center is not None
    _close(bn._center, x.mean(dim=(0, 2)), 1e-6, "center")
    with warnings.catch_warnings():
        warnings.simplefilter("error", sbn.PrecisionWarning)  # centered: no loss
        y = bn(x)
    # x itself is rounded to ulp(1e7) ≈ 2e-9 (std ≈ 1): y's mean is 0 within a few of those.
    _close(y.mean(dim=(0, 2)), torch.zeros(C, dtype=torch.float64), 2e-8, "centered mean")
    bn.eval()(x)
    assert bn._center is not None  # eval (running statistics) keeps it
    bn.load_state_dict(bn.state_dict())
    assert bn._center is None
    with warnings.catch_warnings():
        # No center again: the first step's merge loses precision, which the
        # second statistics pass repairs (no warning, y exact again).
        warnings.simplefilter("error", sbn.PrecisionWarning)
        y = bn.train()(x)
    _close(y.mean(dim=(0, 2)), torch.zeros(C, dtype=torch.float64), 2e-8, "first-step mean")
    bn.comm = sbn.SelfCommunicator()
    assert bn._center is None and not bn._checked


# -- half precision -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("dtype", "tol"),
    # Bound: a few ulps of the half-precision output (|y| ≲ 4 here): float16
    # ulp 2⁻¹⁰, bfloat16 2⁻⁷, relative; x̂ itself is exact in float32.
    [(torch.float16, 4 * 2.0**-10 * 4), (torch.bfloat16, 4 * 2.0**-7 * 4)],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_half_precision_matches_float32_torch(dtype, tol, channels_last) -> None:
    ours, ref = _pair(torch.float32)
    gen = torch.Generator().manual_seed(7)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(4, C, 5, 5, generator=gen) * 2 + 1).to(dtype).contiguous(memory_format=fmt)
    dy = torch.randn(x.shape, generator=gen).to(dtype)
    y, g = _grads(ours, x, dy)
    y_ref, g_ref = _grads(ref, x.float(), dy.float())
    assert y.dtype == dtype and g[0].dtype == dtype and g[1].dtype == torch.float32
    _close(y.float(), y_ref, tol, "y")
    _close(g[0].float(), g_ref[0], tol, "dx")
    # Sums over 100 elements accumulated in float32 from exact half inputs.
    _close(g[1], g_ref[1], 1e-4, "dweight")
    _close(g[2], g_ref[2], 1e-4, "dbias")
    _close(ours.running_mean, ref.running_mean, 1e-6, "running_mean")
    _close(ours.running_var, ref.running_var, 1e-5, "running_var")


# -- state ------------------------------------------------------------------------------
def test_state_dict_round_trips_with_batchnorm2d_strictly() -> None:
    ours, ref = _pair(momentum=0.3)
    ref(torch.randn(4, C, 3, 3))
    ours.load_state_dict(ref.state_dict(), strict=True)
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    ours(torch.randn(4, C, 3, 3) + 2)
    back = torch.nn.BatchNorm2d(C)
    back.load_state_dict(ours.state_dict(), strict=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert int(back.num_batches_tracked) == 2
    # Buffers are updated in place: a reference taken before a step sees it.
    rm = ours.running_mean
    ours(torch.randn(4, C, 3, 3) + 5)
    assert ours.running_mean is rm and int(ours.num_batches_tracked) == 3


def _cnn(bn_cls=torch.nn.BatchNorm2d):
    torch.manual_seed(8)
    block = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), bn_cls(4), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 1)
    )
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 3, 1),
        torch.nn.BatchNorm2d(3, momentum=None),
        torch.nn.Sequential(block, torch.nn.SyncBatchNorm(4, affine=False)),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 5),
        torch.nn.BatchNorm1d(5, track_running_stats=False),
    )


def test_convert_and_revert_keep_parameters_buffers_and_modes() -> None:
    model = _cnn()
    model[2][0][1].weight.requires_grad_(False)
    model[2].eval()
    before = {n: m for n, m in model.named_modules()}
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    reference = _cnn()
    reference[2][0][1].weight.requires_grad_(False)
    reference[2].eval()
    x = torch.randn(4, 3, 6, 6)
    reference(x).sum().backward()
    comm = sbn.SelfCommunicator()
    converted = convert_sync_batchnorm(model, comm=comm)
    assert converted is model
    bns = {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm)}
    assert sorted(bns) == ["1", "2.0.1", "2.1", "5"]
    for name, m in bns.items():
        assert type(m) is SyncBatchNorm and m.comm is comm, name
        assert m.training == before[name].training, name
        for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            assert getattr(m, attr) == getattr(before[name], attr), (name, attr)
    for name, t in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items():
        assert t is tensors[name], name  # the same tensors: optimizers keep working
    assert not model[2][0][1].weight.requires_grad
    model(x).sum().backward()
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert (p.grad is None) == (p_ref.grad is None) == (not p.requires_grad), name
        if p.grad is not None:
            _close(p.grad, p_ref.grad, 1e-4, f"grad of {name}")
    for (name, b), b_ref in zip(model.named_buffers(), reference.buffers(), strict=True):
        _close(b.double(), b_ref.double(), 1e-5, name)

    reverted = revert_sync_batchnorm(model)
    assert reverted is model
    kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)}
    # Back to the classes they were converted from; torch's SyncBatchNorm to BatchNormXd.
    nn = torch.nn
    assert kinds == {
        "1": nn.BatchNorm2d,
        "2.0.1": nn.BatchNorm2d,
        "2.1": BatchNormXd,
        "5": nn.BatchNorm1d,
    }
    assert model[2][1].training is False and model[1].training is True
    for name, t in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items():
        assert t is tensors[name], name
    _close(model(x).detach(), reference(x).detach(), 1e-5, "reverted output")
    # Ours are converted too: they get the new communicator, same tensors.
    again = convert_sync_batchnorm(convert_sync_batchnorm(_cnn()), comm=comm)
    assert all(m.comm is comm for m in again.modules() if isinstance(m, SyncBatchNorm))
    # A single layer comes back as a new layer, as in torch.
    single = convert_sync_batchnorm(torch.nn.BatchNorm3d(2))
    assert type(single) is SyncBatchNorm
    assert type(revert_sync_batchnorm(single)) is torch.nn.BatchNorm3d
    assert type(revert_sync_batchnorm(SyncBatchNorm(2))) is BatchNormXd
    assert type(revert_sync_batchnorm(torch.nn.SyncBatchNorm(2))) is BatchNormXd


def test_reverted_layers_are_the_classes_torch_tools_look_for() -> None:
    """convert, then deepcopy, pickle or convert again, then revert: the
    BatchNorm2d comes back as itself, so torch.ao.quantization fuses it with
    the convolution before it (it found no fuser for BatchNormXd)."""
    import copy
    import io
    import pickle

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    x = torch.randn(2, 3, 6, 6)
    want = model(x)
    converted = convert_sync_batchnorm(model)
    for copied in (
        copy.deepcopy(converted),
        pickle.loads(pickle.dumps(converted)),
        convert_sync_batchnorm(converted, comm=sbn.SelfCommunicator()),
    ):
        reverted = revert_sync_batchnorm(copied)
        assert type(reverted[1]) is torch.nn.BatchNorm2d
        buffer = io.BytesIO()
        torch.save(reverted.state_dict(), buffer)
        fused = torch.ao.quantization.fuse_modules(reverted, [["0", "1"]])
        assert isinstance(fused[1], torch.nn.Identity)
        torch.testing.assert_close(fused(x), want, rtol=1e-5, atol=1e-5)


def test_deepcopy_shares_the_communicator_and_copies_the_rest() -> None:
    import copy

    comm = sbn.thread_group(2)[0]  # holds locks: cannot be copied itself
    model = convert_sync_batchnorm(_cnn(), comm=comm)
    clone = copy.deepcopy(model)
    for m, c in zip(model.modules(), clone.modules(), strict=True):
        if isinstance(m, SyncBatchNorm):
            assert c.comm is comm and type(c) is SyncBatchNorm
    for p, q in zip(model.parameters(), clone.parameters(), strict=True):
        assert p is not q and torch.equal(p, q)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_matches_eager(compiler) -> None:
    if compiler == "inductor" and shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("inductor needs a C++ compiler on the CPU")
    model = convert_sync_batchnorm(_cnn())
    eager = convert_sync_batchnorm(_cnn())
    compiled = torch.compile(model, backend=compiler)
    x = torch.randn(4, 3, 6, 6)
    for _ in range(2):
        y = compiled(x)
        y_eager = eager(x)
        _close(y.detach(), y_eager.detach(), 1e-5, "compiled y")
        y.square().sum().backward()
        y_eager.square().sum().backward()
    for (name, p), p_eager in zip(model.named_parameters(), eager.parameters(), strict=True):
        _close(p.grad, p_eager.grad, 1e-3, f"compiled grad of {name}")
    for (name, b), b_eager in zip(model.named_buffers(), eager.buffers(), strict=True):
        _close(b.double(), b_eager.double(), 1e-5, f"compiled {name}")


# -- torch.distributed, one process ---------------------------------------------------------
@pytest.fixture
def gloo_world_of_one(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialized")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        yield dist
    finally:
        dist.destroy_process_group()


def test_torch_distributed_communicator_in_one_process(gloo_world_of_one) -> None:
    comm = sbn.TorchDistributedCommunicator(timeout=30)
    assert (comm.rank, comm.size, comm.backend) == (0, 1, "gloo")
    buf = torch.tensor([1.0, -2.0, 3.5], dtype=torch.float64)
    out = comm.allreduce(buf)
    assert torch.equal(out, buf) and out is not buf
    assert isinstance(comm.allreduce(np.arange(3.0), "max"), np.ndarray)
    with pytest.raises(ValueError, match="unknown reduction op"):
        comm.allreduce(buf, "min")
    # process_group= means this communicator.
    bn = SyncBatchNorm(C, process_group=torch.distributed.group.WORLD)
    assert isinstance(bn.comm, sbn.TorchDistributedCommunicator)
    ours, ref = _pair()
    ours.comm = bn.comm
    x = torch.randn(4, C, 3, 3)
    _close(ours(x), ref(x), TOL[torch.float32], "y")


def test_torch_distributed_communicator_needs_an_initialized_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialized")
    with pytest.raises(RuntimeError, match="not initialized"):
        sbn.TorchDistributedCommunicator()


def test_importing_arraysyncbn_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, arraysyncbn; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_tensors_match_batchnorm2d(dtype, channels_last) -> None:
    ours, ref = _pair(torch.float32)
    ours, ref = ours.cuda(), ref.cuda()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(4, C, 5, 5, device="cuda").to(dtype).contiguous(memory_format=fmt)
    dy = torch.randn(x.shape, device="cuda").to(dtype)
    y, g = _grads(ours, x, dy)
    y_ref, g_ref = _grads(ref, x, dy)
    tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2}.get(dtype, 1e-5)
    assert y.device == x.device and y.dtype == dtype
    assert y.is_contiguous(memory_format=fmt)
    _close(y.float(), y_ref.float(), tol, "y")
    _close(g[0].float(), g_ref[0].float(), tol, "dx")
    _close(ours.running_mean, ref.running_mean, 1e-5, "running_mean")


def test_readme_pytorch_snippets_run_as_written() -> None:
    """The first two blocks of the README's PyTorch section (the third needs torchrun)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    body = text.split("\n## PyTorch\n")[1].split("\n## ")[0]
    blocks = re.findall(r"```python\n(.*?)```", body, re.S)
    namespace: dict = {}
    for code in blocks[:2]:
        exec(compile(code, "README.md", "exec"), namespace)
    ys = namespace["ys"]
    x = torch.cat(namespace["shards"])
    want = torch.nn.functional.batch_norm(x, None, None, training=True)
    _close(torch.cat(ys), want, 1e-5, "README thread ranks")
    assert type(namespace["model"][1]) is torch.nn.BatchNorm2d  # as the README says


def test_swapped_modules_raise_on_every_rank_instead_of_mixing_statistics() -> None:
    """The module's collectives carry the layer/call signature: rank 1 runs
    layer B before layer A on its second step."""
    xs = [torch.randn(4, 3, 5), torch.randn(2, 3, 5)]

    def rank(comm):
        a, b = SyncBatchNorm(3, comm=comm), SyncBatchNorm(3, comm=comm)
        a(xs[comm.rank]), b(xs[comm.rank])  # step 1 numbers A = 1, B = 2 on both
        order = (a, b) if comm.rank == 0 else (b, a)
        try:
            for layer in order:
                layer(xs[comm.rank])
        except sbn.CollectiveMismatchError as exc:
            return str(exc)
        return "finished"

    got = sbn.run_ranks(rank, sbn.thread_group(2, timeout=30))
    assert "layer 1, call 2, forward" in got[0] and "layer 2, call 2, forward" in got[0], got
    assert "layer 2, call 2, forward" in got[1], got


def test_a_nan_batch_does_not_poison_the_module() -> None:
    bn, ref = SyncBatchNorm(3), torch.nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2) + 5
    bn(x), ref(x)
    bad = x.clone()
    bad[0, 1, 0, 0] = float("nan")
    with pytest.warns(sbn.NonFiniteWarning, match="1"):
        bn(bad)
    # Channel 1 keeps its running statistics; the others update.
    assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()
    x2 = torch.randn(4, 3, 2, 2) + 5
    y = bn(x2)
    want = torch.nn.functional.batch_norm(x2, None, None, training=True)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


# -- found by an adversarial review ---------------------------------------------------
def test_convert_refuses_an_uninitialized_lazy_layer_and_converts_an_initialized_one() -> None:
    """A LazyBatchNorm2d was skipped (it is no BatchNorm2d until its first
    input), so it trained without synchronization, silently."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match="run one forward before convert_sync_batchnorm"):
        convert_sync_batchnorm(model)
    model(torch.randn(2, 3, 5, 5))
    assert type(convert_sync_batchnorm(model)[1]) is SyncBatchNorm


def test_torch_jit_refuses_clearly() -> None:
    bn = SyncBatchNorm(3)
    with pytest.raises(RuntimeError, match=r"cannot be traced or scripted by torch\.jit"):
        torch.jit.trace(bn, torch.randn(4, 3, 2))


@pytest.mark.parametrize("training", [True, False])
def test_meta_tensors_give_shapes(training) -> None:
    bn = SyncBatchNorm(3, device="meta").train(training)
    y = bn(torch.empty(4, 3, 5, device="meta"))
    assert y.is_meta and y.shape == (4, 3, 5)


def test_pickling_refuses_a_communicator_and_works_without() -> None:
    import pickle

    bn = SyncBatchNorm(3, comm=sbn.thread_group(2)[0])
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(bn)
    bn.comm = None
    bn(torch.randn(4, 3))
    back = pickle.loads(pickle.dumps(bn))
    assert torch.equal(back.running_mean, bn.running_mean)
    x = torch.randn(4, 3)
    assert torch.equal(back(x), bn(x))


@pytest.mark.parametrize("differ", ["num_batches_tracked", "parameter dtype"])
def test_ranks_with_different_counts_or_parameter_dtypes_raise(differ) -> None:
    """Both made the running statistics differ between ranks, silently."""
    comms = sbn.thread_group(2, timeout=30)

    def rank(comm):
        dtype = torch.float64 if differ == "parameter dtype" and comm.rank else torch.float32
        bn = SyncBatchNorm(3, momentum=None, comm=comm, dtype=dtype)
        if differ == "num_batches_tracked" and comm.rank:
            bn.num_batches_tracked.fill_(10)
        try:
            bn(torch.randn(4, 3))
        except sbn.CollectiveMismatchError as exc:
            return str(exc)
        return "no error"

    for msg in sbn.run_ranks(rank, comms):
        assert f"{differ} differs" in msg, msg


def test_copy_shares_the_communicator_with_its_own_state() -> None:
    import copy

    comms = sbn.thread_group(2)
    bn = SyncBatchNorm(3, comm=comms[0])
    twin = copy.copy(bn)
    assert twin.comm is bn.comm and twin.weight is bn.weight
    assert twin._sync is not bn._sync


def test_torch_jit_script_refuses_clearly() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), SyncBatchNorm(3))
    with pytest.raises(RuntimeError, match=r"cannot be traced or scripted by torch\.jit"):
        torch.jit.script(model)


def test_a_negative_bit_parameter_runs_the_portable_route() -> None:
    """numpy cannot view a tensor with the negative bit; torch's own error leaked."""
    x = torch.randn(4, 3, 5)
    w = torch.complex(torch.zeros(3), torch.tensor([1.0, 2.0, 3.0])).conj().imag  # -1, -2, -3
    assert w.is_neg()
    y, _, _, saved = sbn.sync_batch_norm_forward(x, w, None, None, None)
    want = sbn.sync_batch_norm_forward(x, w.resolve_neg(), None, None, None)[0]
    assert saved.route == "portable"
    torch.testing.assert_close(y, want)


def test_setting_the_same_communicator_again_changes_nothing() -> None:
    """Re-assigning the same communicator on one rank used to forget that rank's
    consistency check and layer number, so only it ran the check collective."""
    comms = sbn.thread_group(2, timeout=30)

    def rank(comm):
        bn = SyncBatchNorm(3, comm=comm)
        bn(torch.randn(4, 3))
        if comm.rank == 0:
            bn.comm = comm
        return bn(torch.randn(4, 3)).shape

    assert sbn.run_ranks(rank, comms) == [torch.Size([4, 3])] * 2


def test_torch_spellings_of_a_process_group_are_wrapped_once(gloo_world_of_one) -> None:
    """torch's ways of naming the group: ``convert_sync_batchnorm(model, pg)``
    (positional), ``process_group=pg``, the classmethod
    ``SyncBatchNorm.convert_sync_batchnorm``, and a group given as ``comm``.
    convert wraps it once: every layer is on one communicator object (layers
    are numbered per communicator in the calls' signatures)."""
    pg = torch.distributed.group.WORLD
    converted = [
        convert_sync_batchnorm(_net(), pg),
        convert_sync_batchnorm(_net(), process_group=pg),
        SyncBatchNorm.convert_sync_batchnorm(_net(), pg),
    ]
    for model in converted:
        layers = [m for m in model.modules() if isinstance(m, SyncBatchNorm)]
        assert len(layers) == 2
        assert isinstance(layers[0].comm, sbn.TorchDistributedCommunicator)
        assert layers[0].comm is layers[1].comm
        model(torch.randn(4, 3, 5, 5))
    assert isinstance(SyncBatchNorm(C, comm=pg).comm, sbn.TorchDistributedCommunicator)
    bn = SyncBatchNorm(C)
    bn.comm = pg
    assert isinstance(bn.comm, sbn.TorchDistributedCommunicator)
    with pytest.raises(TypeError, match="process_group or comm"):
        convert_sync_batchnorm(_net(), sbn.SelfCommunicator(), process_group=pg)


def test_process_group_attribute_reads_and_sets_the_communicator(gloo_world_of_one) -> None:
    """torch.nn.SyncBatchNorm's ``process_group`` attribute: read, the group
    synchronized over; assigned, the layer's communicator (it used to be a
    plain attribute that changed nothing)."""
    pg = torch.distributed.group.WORLD
    bn = SyncBatchNorm(C, process_group=pg)
    assert bn.process_group is pg
    assert SyncBatchNorm(C).process_group is None  # a world of one
    assert SyncBatchNorm(C, comm=sbn.TorchDistributedCommunicator()).process_group is None
    bn = SyncBatchNorm(C)
    bn.process_group = pg
    assert isinstance(bn.comm, sbn.TorchDistributedCommunicator) and bn.comm.group is pg
    assert bn.comm is SyncBatchNorm(C, process_group=pg).comm  # one wrapper per group
    bn.process_group = None
    assert isinstance(bn.comm, sbn.SelfCommunicator)
    assert "process_group" not in bn.__dict__


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 4, 1),
        torch.nn.BatchNorm2d(4),
    )  # fmt: skip


def test_raw_torch_group_is_refused_by_the_functional_api(gloo_world_of_one) -> None:
    """Accepted as a duck-typed communicator, a ProcessGroup failed inside the
    first allreduce (pybind's incompatible-arguments error)."""
    x = np.ones((4, 3), np.float32)
    with pytest.raises(TypeError, match=r"raw torch group.*TorchDistributedCommunicator"):
        sbn.sync_batch_norm_forward(x, None, None, None, None, comm=torch.distributed.group.WORLD)


def test_a_world_of_one_in_a_distributed_job_warns(monkeypatch) -> None:
    """Swapping torch.nn.SyncBatchNorm for ours under torchrun gave silently
    unsynchronized batch norm: torch's process_group=None is the default
    group, our comm=None this process. The first training forward warns
    (once per layer; eval and a layer with a communicator do not)."""
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    x = torch.randn(4, C, 2)
    bn = SyncBatchNorm(C)
    with pytest.warns(UserWarning, match=r"normalizes over this process only.*2 processes"):
        bn(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bn(x)  # the layer's first call warned already
        SyncBatchNorm(C).eval()(x)
        sbn.run_ranks(lambda comm: SyncBatchNorm(C, comm=comm)(x), sbn.thread_group(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # A group of one chosen on purpose (a thread group here, a
        # new_group([rank]) under torchrun) is not the mistake warned about.
        SyncBatchNorm(C, comm=sbn.thread_group(1)[0])(x)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SyncBatchNorm(C)(x)


def test_export_in_training_mode_raises_a_clear_error() -> None:
    if not hasattr(torch, "export"):
        pytest.skip("no torch.export")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), SyncBatchNorm(3))
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="cannot be exported in training mode"):
        torch.export.export(model, (x,))
    model.eval()
    for strict in (False, True):
        exported = torch.export.export(model, (x,), strict=strict)
        _close(exported.module()(x), model(x), TOL[torch.float32], f"exported eval {strict=}")


@pytest.mark.parametrize("tracking", [True, False])
def test_eval_mode_compiles_without_a_graph_break(tracking) -> None:
    """Eval never communicates: under torch.compile it is plain batch norm,
    so fullgraph=True holds it (running statistics, or the local batch's
    without track_running_stats); training mode stays a named graph break."""
    torch._dynamo.reset()
    model = convert_sync_batchnorm(_cnn())
    for m in model.modules():
        if isinstance(m, SyncBatchNorm):
            m.track_running_stats = tracking
    x = torch.randn(4, 3, 6, 6)
    model(x)  # a training step: running statistics that are not the defaults
    model.eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    xg = x.clone().requires_grad_(True)
    y = compiled(xg)
    _close(y, model(x), 1e-5, "compiled eval y")
    y.sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    model.train()
    torch._dynamo.reset()
    with pytest.raises(Exception, match="SyncBatchNorm runs compiled kernels"):
        torch.compile(model, backend="aot_eager", fullgraph=True)(x)


def test_a_copy_is_a_new_layer_to_the_communicator() -> None:
    """Copies used to keep the original's layer number and call count, so
    ranks that trained the copy where others trained the original mixed the
    two layers' statistics without an error. Now a copy is numbered at its
    own first communicating call: that case raises on every rank, and a copy
    trained on every rank matches the original."""
    import copy

    x = torch.randn(6, C, 3)
    for make in (copy.copy, copy.deepcopy):
        comms = sbn.thread_group(2, timeout=10)
        layers = [SyncBatchNorm(C, comm=c) for c in comms]
        for bn in layers:
            bn._sync.layer, bn._sync.calls = 1, 5  # as after earlier training steps
        twins = [make(bn) for bn in layers]

        def mixed(comm, layers=layers, twins=twins):
            chosen = layers if comm.rank == 0 else twins
            with torch.no_grad():
                return chosen[comm.rank](x.split(3)[comm.rank])

        results = sbn.run_ranks(mixed, comms, return_exceptions=True)
        for res in results:
            assert isinstance(res, sbn.CollectiveMismatchError), (make.__name__, res)

    comms = sbn.thread_group(2, timeout=10)
    layers = [SyncBatchNorm(C, comm=c) for c in comms]
    twins = [copy.deepcopy(bn) for bn in layers]
    ys = sbn.run_ranks(lambda comm: twins[comm.rank](x.split(3)[comm.rank]).detach(), comms)
    ref = torch.nn.BatchNorm1d(C)
    _close(torch.cat(ys), ref(x).detach(), TOL[torch.float32], "deepcopy trained on every rank")


# -- the layer's numpy route (float32/float64 CPU tensors) ------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_numpy_route_is_the_tensor_route_bit_for_bit(dtype, channels_last, monkeypatch) -> None:
    """float32/float64 CPU layers call the functional API on numpy views of
    their tensors (no conversions per argument and result inside the call):
    y, the gradients, the running statistics and the merge center are the
    tensor route's bits, over training steps, a far-from-zero batch and eval."""
    import arraysyncbn.torch as abt

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(4, C, 3, 3, generator=gen, dtype=dtype) * 2 + 1e3 * k for k in (0, 1, 0)]
    dys = [torch.randn(4, C, 3, 3, generator=gen, dtype=dtype) for _ in xs]
    results = {}
    for route in ("numpy", "tensor"):
        if route == "tensor":
            monkeypatch.setattr(abt, "_host_views", lambda x, tensors, comm: None)
        bn = SyncBatchNorm(C, momentum=None, dtype=dtype)
        out = []
        for x, dy in zip(xs, dys, strict=True):
            x = x.contiguous(memory_format=fmt).requires_grad_()
            y = bn(x)
            y.backward(dy)
            out += [y.detach(), x.grad, bn.weight.grad.clone(), bn.bias.grad.clone()]
            out += [bn.running_mean.clone(), bn.running_var.clone(), bn._center]
            bn.weight.grad = bn.bias.grad = None
        out.append(bn.num_batches_tracked.clone())
        with torch.no_grad():
            out.append(bn.eval()(xs[0]))
        results[route] = out
    for i, (a, b) in enumerate(zip(results["numpy"], results["tensor"], strict=True)):
        assert torch.equal(a, b), i
    assert results["numpy"][-2].item() == 3


def test_numpy_route_runs_where_it_applies(monkeypatch) -> None:
    """float32/float64 CPU input runs the functional API on numpy arrays;
    bfloat16 and float16 keep torch tensors (rounded as torch rounds), and a
    layer switching between them keeps working."""
    import arraysyncbn.torch as abt

    seen = []
    real = abt.F.sync_batch_norm_forward

    def spy(x, *args, **kwargs):
        seen.append(type(x).__module__.partition(".")[0])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(abt.F, "sync_batch_norm_forward", spy)
    bn = SyncBatchNorm(C)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float32):
        bn(torch.randn(4, C, 2).to(dtype)).float().sum().backward()
    assert seen == ["numpy", "torch", "torch", "numpy"]
    assert bn.num_batches_tracked.item() == 4


@pytest.mark.parametrize("fast", ["0", "1"])
def test_numpy_views_take_the_route_the_environment_asks_for(fast, monkeypatch) -> None:
    """float32 CPU tensors reach the functional API as numpy views on the
    host route; with ARRAYSYNCBN_FAST=0 the portable route runs on the
    tensors themselves (torch's operations: a non-finite batch raises no
    numpy warning). Both give BatchNorm2d's results."""
    import arraysyncbn.torch as abt

    monkeypatch.setenv("ARRAYSYNCBN_FAST", fast)
    routes = []
    real = abt.F.sync_batch_norm_forward

    def spy(x, *args, **kwargs):
        out = real(x, *args, **kwargs)
        routes.append((type(x).__module__.partition(".")[0], out[3].route))
        return out

    monkeypatch.setattr(abt.F, "sync_batch_norm_forward", spy)
    ours, ref = _pair()
    x = torch.randn(4, C, 3, 3)
    x_ref = x.clone().requires_grad_(True)
    x.requires_grad_(True)
    y, y_ref = ours(x), ref(x_ref)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    assert routes == [("numpy", "host") if fast == "1" else ("torch", "portable")]
    _close(y, y_ref, TOL[torch.float32], "y")
    _close(x.grad, x_ref.grad, TOL[torch.float32], "dx")
    _close(ours.weight.grad, ref.weight.grad, SUM_TOL[torch.float32], "dweight")
    _close(ours.running_var, ref.running_var, TOL[torch.float32], "running_var")


def test_a_non_finite_batch_with_the_fast_route_off_warns_only_ours(monkeypatch) -> None:
    """With ARRAYSYNCBN_FAST=0 the layer runs torch's operations, which do not
    warn of inf − inf: only the package's NonFiniteWarning, and the step
    completes (numpy's RuntimeWarning raised midway under -W error)."""
    monkeypatch.setenv("ARRAYSYNCBN_FAST", "0")
    layer = SyncBatchNorm(C)
    x = torch.randn(4, C, 3, 3)
    x[0, 1, 0, 0] = float("inf")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        layer(x)
    kinds = {type(w.message) for w in seen}
    assert kinds == {sbn.NonFiniteWarning}, [str(w.message) for w in seen]
    assert int(layer.num_batches_tracked) == 1


@pytest.mark.parametrize(
    "x_dtype, layer_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32)]
)
def test_compiled_eval_takes_the_dtype_mixes_eager_eval_takes(x_dtype, layer_dtype) -> None:
    """Eval under torch.compile is torch's batch norm only where torch takes
    the dtypes; other mixes, which the layer takes in eager mode, keep the
    layer's own step (a graph break) with eager's result."""
    torch._dynamo.reset()
    layer = SyncBatchNorm(C, dtype=layer_dtype)
    layer(torch.randn(4, C, 2, 2, dtype=layer_dtype))
    layer.eval()
    x = torch.randn(4, C, 2, 2, dtype=x_dtype)
    want = layer(x)
    got = torch.compile(layer, backend="eager")(x)
    assert got.dtype == want.dtype == x_dtype
    _close(got, want, TOL[torch.float32], "compiled eval y")
    torch._dynamo.reset()


def test_numpy_route_bumps_the_buffers_versions() -> None:
    """The numpy route writes the running statistics through numpy, then bumps
    their version as torch's in-place ops do (as the tensor route's copy_
    did): a graph that saved a buffer refuses a backward after a training
    step changed it, instead of a silently wrong gradient. (torch 2.13's own
    BatchNorm1d does not bump it: its backward here runs, with the new values.)"""
    bn = SyncBatchNorm(C)
    w = torch.ones(C, requires_grad=True)
    loss = (w * bn.running_mean).sum()  # saves running_mean for w's gradient
    version = bn.running_mean._version
    bn(torch.randn(4, C, 2))
    assert bn.running_mean._version > version
    assert bn.running_var._version > 0 and bn.num_batches_tracked._version > 0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_a_group_is_wrapped_once_whichever_spelling(gloo_world_of_one) -> None:
    """Every spelling of one torch.distributed group gives the same
    communicator object, so layers built separately are numbered apart in
    the calls' signatures (a fresh wrapper per layer made each "layer 1")."""
    pg = torch.distributed.group.WORLD
    a, b = SyncBatchNorm(C, process_group=pg), SyncBatchNorm(C, comm=pg)
    c = SyncBatchNorm(C)
    c.comm = pg
    model = convert_sync_batchnorm(_net(), pg)
    assert a.comm is b.comm is c.comm is model[1].comm


def test_a_custom_communicator_gets_tensors_from_a_float32_layer() -> None:
    """The layer's numpy route is for this package's communicators; a user's
    own is promised buffers of the caller's library (torch tensors here)."""
    seen = []

    class Custom:
        rank, size = 0, 1

        def allreduce(self, buf, op="sum"):
            seen.append(type(buf))
            return buf.clone()

    bn = SyncBatchNorm(C, comm=Custom())
    bn(torch.randn(4, C, 3, requires_grad=True)).sum().backward()
    assert seen and all(t is torch.Tensor for t in seen), seen


def test_numpy_route_keeps_torch_thread_count(monkeypatch) -> None:
    """float32 layers run on numpy views, but their kernels take at most
    torch's thread count, as on tensors (torch.set_num_threads, torchrun)."""
    import numba

    from arraysyncbn._fast import host

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba's pool has one thread")
    monkeypatch.delenv("ARRAYSYNCBN_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    parts = []
    real_bind = host.HostKernels.bind

    def bind(self, *args):
        bound = real_bind(self, *args)
        parts.append(self.parts)
        return bound

    monkeypatch.setattr(host.HostKernels, "bind", bind)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.randn(64, C, 32, 32)  # above the size that goes parallel
        assert x.numel() * 4 >= host.PARALLEL_MIN_BYTES
        SyncBatchNorm(C)(x.requires_grad_()).sum().backward()
    finally:
        torch.set_num_threads(before)
    assert parts and set(parts) == {1}, parts


def test_forward_mode_ad_is_refused_not_dropped() -> None:
    """Dual tensors need not require grad: the layer used to skip its autograd
    Function then and return no tangent; it now says it has no jvp."""
    import torch.autograd.forward_ad as fwad

    bn = SyncBatchNorm(C).eval().requires_grad_(False)
    x = torch.randn(4, C, 3)
    with fwad.dual_level(), pytest.raises(NotImplementedError):
        bn(fwad.make_dual(x, torch.ones_like(x)))


def test_warnings_point_at_the_callers_line() -> None:
    """A NonFiniteWarning raised through the module (torch's call machinery,
    the layer's step, the functional API) is attributed to the line that
    called the model, as through the functional API and the numpy layer."""
    import inspect

    x = torch.randn(4, C, 2, 2)
    x[0, 1, 0, 0] = float("nan")
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    calls = [
        lambda: SyncBatchNorm(C)(x),
        lambda: sbn.sync_batch_norm_forward(x.numpy(), None, None, rm, rv),
        lambda: sbn.SyncBatchNorm(C)(x.numpy()),
    ]
    for call in calls:
        with pytest.warns(sbn.NonFiniteWarning, match=r"channel\(s\) \[1\]") as record:
            call()
        (w,) = [r for r in record if issubclass(r.category, sbn.NonFiniteWarning)]
        assert (w.filename, w.lineno) == (__file__, inspect.getsourcelines(call)[1]), w
