"""The host fast route: same answers as the portable route, where and when it runs.

The property tests (``test_properties``) already hold both routes to the
float64 reference; here the two routes are compared with each other on the
same draws, and the route's contracts are pinned down: which inputs take it,
memory layouts, ``out=``, threads, its switches and its memory use.
"""

from __future__ import annotations

import os
import tracemalloc
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import arraysyncbn as sbn
from arraysyncbn import _fast
from arraysyncbn._fast import host
from arraysyncbn.testing import (
    backward_bounds,
    channel_bound,
    dtype_eps,
    forward_bounds,
    reference_backward,
    to_numpy,
)
from arraysyncbn.testing import reference_forward as ref_forward
from arraysyncbn.testing.strategies import sharded_batches

from backends import BACKENDS, routed

HOST = next(b for b in BACKENDS if b.name == "numpy")
PORTABLE = next(b for b in BACKENDS if b.name == "numpy-portable")


def _step(x, dy, w, b, rm, rv, *, axis=1, out=None, dx_out=None, training=True, **kw):
    y, nrm, nrv, saved = sbn.sync_batch_norm_forward(
        x, w, b, rm, rv, axis=axis, out=out, training=training, **kw
    )
    dx, dw, db = sbn.sync_batch_norm_backward(dy, saved, out=dx_out)
    return {"y": y, "rm": nrm, "rv": nrv, "dx": dx, "dw": dw, "db": db, "route": saved.route}


_NAMED = {b.name: b for b in BACKENDS}
ROUTE_PAIRS = [
    pytest.param(_NAMED[name], _NAMED[f"{name}-portable"], id=name)
    for name in ("numpy", "torch")
    if name in _NAMED
]


@pytest.mark.parametrize("fast_backend, slow_backend", ROUTE_PAIRS)
@given(data=st.data())
def test_host_and_portable_routes_agree_within_the_reference_bounds(
    fast_backend, slow_backend, data
) -> None:
    """Both routes on the same draw: each within its bound of float64, so within
    twice the bound of each other (per channel). Half-precision input comes
    with float32 parameters or parameters of its own dtype."""
    batch = data.draw(
        sharded_batches(ranks=st.just(1), dtypes=st.sampled_from(fast_backend.dtypes)),
        label="batch",
    )
    pd = fast_backend.param_dtype(batch.dtype)
    if pd != batch.dtype and data.draw(st.booleans(), label="half parameters"):
        pd = batch.dtype

    def p(a, dtype=pd):
        return fast_backend.asarray(a, dtype)

    x, dy = p(batch.shards[0], batch.dtype), p(batch.dys[0], batch.dtype)
    args = (x, dy, p(batch.weight), p(batch.bias), p(batch.running_mean), p(batch.running_var))
    with warnings.catch_warnings():
        warnings.simplefilter("error", sbn.PrecisionWarning)  # second pass: exact
        with routed(fast_backend):
            fast = _step(*args, axis=batch.axis, eps=batch.eps, momentum=batch.momentum)
        with routed(slow_backend):
            slow = _step(*args, axis=batch.axis, eps=batch.eps, momentum=batch.momentum)
    assert fast["route"] == "host" and slow["route"] == "portable"
    w, b = p(batch.weight), p(batch.bias)
    ref = ref_forward(
        [to_numpy(x)], to_numpy(w), to_numpy(b), to_numpy(args[4]), to_numpy(args[5]),
        momentum=batch.momentum, eps=batch.eps, axis=batch.axis,
    )  # fmt: skip
    fb = forward_bounds(
        ref, batch.dtype, weight=w, bias=b, param_dtype=pd, momentum=batch.momentum
    )  # fmt: skip
    grads = reference_backward(ref, [to_numpy(dy)], to_numpy(w))
    bb = backward_bounds(ref, grads, [dy], batch.dtype, weight=w, param_dtype=pd)
    for key, bound in (("y", fb.y), ("dx", bb.dx)):
        limit = 2 * channel_bound(np.asarray(bound, dtype=np.float64), x.ndim, batch.axis)
        diff = np.abs(to_numpy(fast[key]).astype(np.float64) - to_numpy(slow[key]))
        assert np.all(diff <= limit), f"{key}: routes differ by {diff.max():.3e}"
    per_channel = (
        ("dw", bb.dweight), ("db", bb.dbias), ("rm", fb.running_mean), ("rv", fb.running_var),
    )  # fmt: skip
    for key, bound in per_channel:
        if fast[key] is None:
            assert slow[key] is None, key
            continue
        assert fast[key].dtype == slow[key].dtype, key
        diff = np.abs(to_numpy(fast[key]).astype(np.float64) - to_numpy(slow[key]))
        limit = 2 * np.asarray(bound, dtype=np.float64)
        assert np.all(diff <= limit), f"{key}: routes differ by {diff.max():.3e}"  # NaN fails


def _data(shape, axis, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[axis]
    view = [1] * len(shape)
    view[axis] = c
    x = (rng.standard_normal(shape) * 2 + np.arange(c).reshape(view) * 10).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    params = [np.linspace(0.5, 2, c, dtype=dtype), np.linspace(-1, 1, c, dtype=dtype)]
    return x, dy, [*params, np.zeros(c, dtype), np.ones(c, dtype)]


def _close(a, b, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol, atol)


@pytest.mark.parametrize(
    "make, route",
    [
        (lambda x: x, "host"),
        (lambda x: np.asfortranarray(x), "portable"),  # no (P, C, Q) view without a copy
        (lambda x: x[:, :, ::2], "portable"),
    ],
    ids=["contiguous", "fortran", "strided"],
)
def test_layouts_take_the_route_they_can_and_agree(make, route, monkeypatch) -> None:
    monkeypatch.setenv("ARRAYSYNCBN_FAST", "1")
    x, dy, params = _data((4, 3, 10, 5), 1)
    x, dy = make(x), make(dy)
    got = _step(x, dy, *params)
    assert got["route"] == route
    monkeypatch.setenv("ARRAYSYNCBN_FAST", "0")
    want = _step(np.ascontiguousarray(x), np.ascontiguousarray(dy), *params)
    for key in ("y", "dx", "dw", "db", "rm", "rv"):
        _close(got[key], want[key])


def test_torch_channels_last_tensors_run_the_host_route_without_copies(monkeypatch) -> None:
    torch = pytest.importorskip("torch")
    monkeypatch.setenv("ARRAYSYNCBN_FAST", "1")
    x, dy, params = _data((4, 6, 5, 7), 1)
    xt = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
    dyt = torch.from_numpy(dy)  # NCHW-contiguous: the route copies it to x's layout
    pt = [torch.from_numpy(p) for p in params]
    got = _step(xt, dyt, *pt)
    assert got["route"] == "host"
    assert isinstance(got["y"], torch.Tensor) and got["y"].dtype == torch.float32
    assert got["y"].is_contiguous(memory_format=torch.channels_last), "y keeps x's layout"
    want = _step(x, dy, *params)
    for key in ("y", "dx", "dw", "db", "rm", "rv"):
        assert isinstance(got[key], torch.Tensor), key
        _close(got[key].numpy(), want[key])


def test_torch_tensors_that_require_grad_are_accepted(monkeypatch) -> None:
    torch = pytest.importorskip("torch")
    monkeypatch.setenv("ARRAYSYNCBN_FAST", "1")
    x, dy, params = _data((4, 3, 6), 1)
    xt = torch.from_numpy(x).requires_grad_(True)
    w = torch.from_numpy(params[0]).requires_grad_(True)
    got = _step(xt, torch.from_numpy(dy), w, *(torch.from_numpy(p) for p in params[1:]))
    assert got["route"] == "host"
    _close(got["y"].detach().numpy(), _step(x, dy, *params)["y"])


@pytest.mark.parametrize("fast", ["1", "0"])
@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_out_receives_y_and_dx(fast, library, monkeypatch) -> None:
    """``out`` itself comes back (torch's host route used to return a new
    tensor over its memory)."""
    monkeypatch.setenv("ARRAYSYNCBN_FAST", fast)
    x, dy, params = _data((4, 3, 10), 1)
    y_out, dx_out = np.full_like(x, np.nan), np.full_like(x, np.nan)
    if library == "torch":
        torch = pytest.importorskip("torch")
        x, dy, y_out, dx_out, *params = (
            None if a is None else torch.from_numpy(a) for a in (x, dy, y_out, dx_out, *params)
        )
    got = _step(x, dy, *params, out=y_out, dx_out=dx_out)
    assert got["y"] is y_out and got["dx"] is dx_out
    want = _step(x, dy, *params)
    _close(np.asarray(y_out), np.asarray(want["y"]))
    _close(np.asarray(dx_out), np.asarray(want["dx"]))


@pytest.mark.parametrize(
    "out, error",
    [
        (np.empty((4, 3, 9), np.float32), ValueError),
        (np.empty((4, 3, 10), np.float64), ValueError),
        ([[0.0]], TypeError),
    ],
    ids=["shape", "dtype", "not-an-array"],
)
def test_bad_out_is_rejected(out, error) -> None:
    x, _, params = _data((4, 3, 10), 1)
    with pytest.raises(error, match="out"):
        sbn.sync_batch_norm_forward(x, *params, out=out)


def test_dy_of_another_dtype_is_cast(monkeypatch) -> None:
    monkeypatch.setenv("ARRAYSYNCBN_FAST", "1")
    x, dy, params = _data((4, 3, 10), 1)
    got = _step(x, dy.astype(np.float64), *params)
    assert got["dx"].dtype == np.float32
    _close(got["dx"], _step(x, dy, *params)["dx"])


def test_eval_forward_and_its_backward_on_the_host_route(monkeypatch) -> None:
    monkeypatch.setenv("ARRAYSYNCBN_FAST", "1")
    x, dy, (w, b, _, _) = _data((4, 3, 10), 1)
    rm, rv = np.array([0.0, 10.0, 20.0], np.float32), np.array([4.0, 4.0, 4.0], np.float32)
    got = _step(x, dy, w, b, rm, rv, training=False)
    assert got["route"] == "host" and got["rm"] is rm and got["rv"] is rv
    view = (1, 3, 1)
    want_y = (x - rm.reshape(view)) / np.sqrt(rv.reshape(view) + 1e-5) * w.reshape(view)
    _close(got["y"], want_y + b.reshape(view), rtol=1e-5, atol=1e-5)
    _close(got["dx"], dy * (w / np.sqrt(rv + 1e-5)).reshape(view))


@pytest.mark.parametrize("replace_environ", [False, True])
def test_the_fast_switch_follows_every_change_of_the_environment(
    replace_environ, monkeypatch
) -> None:
    """The route reads ARRAYSYNCBN_FAST through the dict behind os.environ (a
    lookup, not os.environ.get's frames): every set, change and unset is
    seen on the next call, a bad value raises each time it is asked, and an
    os.environ replaced by another mapping is read through that mapping."""
    import os

    if replace_environ:
        monkeypatch.setattr(os, "environ", dict(os.environ))
    x, dy, params = _data((4, 3, 10), 1)
    monkeypatch.delenv("ARRAYSYNCBN_FAST", raising=False)
    assert _step(x, dy, *params)["route"] == "host"
    for value, route in [("0", "portable"), ("1", "host"), (" OFF ", "portable"), ("yes", "host")]:
        monkeypatch.setenv("ARRAYSYNCBN_FAST", value)
        assert _step(x, dy, *params)["route"] == route, value
    monkeypatch.setenv("ARRAYSYNCBN_FAST", "fsat")
    for _ in range(2):  # never remembered as valid
        with pytest.raises(ValueError, match="ARRAYSYNCBN_FAST must be"):
            _fast._disabled()
    monkeypatch.delenv("ARRAYSYNCBN_FAST")
    assert _step(x, dy, *params)["route"] == "host"


def test_fast_switch_and_missing_numba_fall_back_to_portable(monkeypatch) -> None:
    x, dy, params = _data((4, 3, 10), 1)
    monkeypatch.setenv("ARRAYSYNCBN_FAST", "0")
    assert _step(x, dy, *params)["route"] == "portable"
    assert "ARRAYSYNCBN_FAST=0" in _fast.route_info()
    monkeypatch.setenv("ARRAYSYNCBN_FAST", "1")
    monkeypatch.setattr(_fast, "_host_module", None)
    monkeypatch.setattr(_fast, "_numba_error", "numba cannot be imported (planted)")
    assert _step(x, dy, *params)["route"] == "portable"
    assert "numba cannot be imported" in _fast.route_info()


@pytest.mark.parametrize(
    "fast, route",
    [("1", "host"), ("", "host"), (" Yes ", "host"), ("on", "host"), ("TRUE", "host"),
     ("0", "portable"), ("off", "portable"), (" No", "portable"), ("False", "portable")],
)  # fmt: skip
def test_fast_switch_takes_the_usual_words_for_on_and_off(fast, route, monkeypatch) -> None:
    monkeypatch.setenv("ARRAYSYNCBN_FAST", fast)
    x, dy, params = _data((4, 3, 10), 1)
    assert _step(x, dy, *params)["route"] == route


@pytest.mark.parametrize("fast", ["foo", "2", "of", "disable"])
def test_fast_switch_refuses_other_values(fast, monkeypatch) -> None:
    """A typo used to run the fast route silently, as if the switch were on."""
    monkeypatch.setenv("ARRAYSYNCBN_FAST", fast)
    x, dy, params = _data((4, 3, 10), 1)
    want = (
        f"ARRAYSYNCBN_FAST must be 0, 1, true, false, yes, no, on or off (any case), got '{fast}'"
    )
    for call in (lambda: _step(x, dy, *params), _fast.route_info, _fast.check_environment):
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value) == want


@pytest.mark.parametrize("threads", ["abc", "0", "-1", "1.5", "\u00b2"])
def test_check_environment_refuses_a_bad_thread_count(threads, monkeypatch) -> None:
    """Up front, whatever the input size: the kernels ask only for inputs
    large enough to thread, so a job saw it mid-run, on some ranks only."""
    monkeypatch.delenv("ARRAYSYNCBN_FAST", raising=False)
    monkeypatch.setenv("ARRAYSYNCBN_THREADS", threads)
    with pytest.raises(
        ValueError, match=f"ARRAYSYNCBN_THREADS must be a positive integer, got '{threads}'"
    ):
        _fast.check_environment()
    monkeypatch.setenv("ARRAYSYNCBN_THREADS", " 2 ")
    _fast.check_environment()


@pytest.mark.parametrize("fast, route", [("1", "host"), ("0", "portable")])
def test_half_precision_runs_the_host_route(fast, route, monkeypatch) -> None:
    monkeypatch.setenv("ARRAYSYNCBN_FAST", fast)
    x, dy, params = _data((4, 3, 10), 1, dtype=np.float32)
    got = _step(x.astype(np.float16), dy.astype(np.float16), *params)
    assert got["route"] == route and got["y"].dtype == np.float16
    assert got["dx"].dtype == np.float16 and got["rm"].dtype == np.float32
    torch = pytest.importorskip("torch")
    for dtype in (torch.float16, torch.bfloat16):
        xt, dyt = torch.from_numpy(x).to(dtype), torch.from_numpy(dy).to(dtype)
        got = _step(xt, dyt, *(torch.from_numpy(p) for p in params))
        assert got["route"] == route and got["y"].dtype == dtype and got["dx"].dtype == dtype


def _clear_thread_env(monkeypatch) -> None:
    for name in ("ARRAYSYNCBN_THREADS", "OMP_NUM_THREADS", *host._LOCAL_SIZE_VARS):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("replace_environ", [False, True])
def test_thread_count_divides_the_pool_among_node_ranks(replace_environ, monkeypatch) -> None:
    """Every change of a variable is seen at the next call (the counts worked
    out are kept per combination of raw values), also through an
    ``os.environ`` replaced by another mapping."""
    import os

    import numba

    if replace_environ:
        monkeypatch.setattr(os, "environ", dict(os.environ))
    pool = numba.config.NUMBA_NUM_THREADS
    _clear_thread_env(monkeypatch)
    assert host.thread_count() == pool
    monkeypatch.setenv("MPI_LOCALNRANKS", str(pool * 4))
    assert host.thread_count() == 1, "never below one thread"
    monkeypatch.delenv("MPI_LOCALNRANKS")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(pool * 4))  # torchrun's
    assert host.thread_count() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "nonsense")  # not ours to refuse
    assert host.thread_count() == pool
    monkeypatch.setenv("MPI_LOCALNRANKS", "1")
    monkeypatch.setenv("ARRAYSYNCBN_THREADS", "1")
    assert host.thread_count() == 1
    monkeypatch.setenv("ARRAYSYNCBN_THREADS", "many")
    with pytest.raises(ValueError, match="ARRAYSYNCBN_THREADS"):
        host.thread_count()


def test_thread_count_respects_omp_num_threads(monkeypatch) -> None:
    import numba

    pool = numba.config.NUMBA_NUM_THREADS
    _clear_thread_env(monkeypatch)
    monkeypatch.setenv("OMP_NUM_THREADS", "1,2")  # nested levels: the first is ours
    assert host.thread_count() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", str(pool + 5))
    assert host.thread_count() == pool, "never more than numba's pool"
    monkeypatch.setenv("ARRAYSYNCBN_THREADS", str(pool))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert host.thread_count() == pool, "ARRAYSYNCBN_THREADS comes first"


def test_unreadable_launcher_and_openmp_variables_are_ignored(monkeypatch) -> None:
    """A launcher's or OpenMP's variable that is not a plain positive integer
    is ignored: "²" (str.isdigit but not int()) used to raise ValueError from
    inside the forward."""
    import numba

    pool = numba.config.NUMBA_NUM_THREADS
    _clear_thread_env(monkeypatch)
    for value in ("\u00b2", "0", "-1", "", " , ", "x2"):
        monkeypatch.setenv("OMP_NUM_THREADS", value)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", value)
        assert host.thread_count() == pool, value
    monkeypatch.setenv("OMP_NUM_THREADS", " 1 ")
    assert host.thread_count() == 1


def test_torch_tensors_use_at_most_torch_thread_count(monkeypatch) -> None:
    """A torch user's ``set_num_threads`` holds for our kernels too: before,
    numba's pool size ran on a process torch had been told to keep to one
    thread (torchrun's default per rank), oversubscribing the cores."""
    torch = pytest.importorskip("torch")
    import numba

    pool = numba.config.NUMBA_NUM_THREADS
    _clear_thread_env(monkeypatch)
    monkeypatch.setenv("OMP_NUM_THREADS", str(pool))  # numpy's rule would say pool
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert host.thread_count("torch") == 1
        assert host.thread_count() == pool
        x = torch.randn(64, 16, 32, 32)  # 4 MiB: above the serial threshold
        kern = _fast.host_kernels(_fast.host_io(x)).bind(_fast.host_io(x).to_numpy(x), 1, None)
        assert kern is not None and kern.parts == 1
        torch.set_num_threads(pool + 3)
        assert host.thread_count("torch") == pool, "never more than numba's pool"
        monkeypatch.setenv("MPI_LOCALNRANKS", str(pool))  # mpiexec: ranks share the cores
        assert host.thread_count("torch") == 1
    finally:
        torch.set_num_threads(before)


def test_threaded_kernels_match_serial_ones(monkeypatch) -> None:
    """The same input through 1 and 2 threads (the threshold lifted): the same
    results up to the order of float64 partial sums."""
    x, dy, params = _data((6, 5, 33), 1, dtype=np.float64)
    monkeypatch.setenv("ARRAYSYNCBN_FAST", "1")
    serial = _step(x, dy, *params)
    monkeypatch.setattr(host, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setenv("ARRAYSYNCBN_THREADS", "2")
    threaded = _step(x, dy, *params)
    for key in ("y", "dx", "dw", "db", "rm", "rv"):
        _close(threaded[key], serial[key], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(3, 5, 7), (5, 3, 130), (1, 4, 3), (4, 1, 2), (7, 6, 1)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_threaded_kernels_split_samples_anywhere(shape, dtype) -> None:
    """Every threaded kernel on 1 to 9 chunks of the ``P·C`` planes, chunk
    edges inside a sample's channels included (the kernels loop over whole
    samples between a chunk's partial first and last ones): the elementwise
    results equal the serial kernels' bit for bit, and on integer-valued
    data (exact sums in any order) the partial sums add up to numpy's."""
    from arraysyncbn._fast import host_jit as hk

    rng = np.random.default_rng(11)
    c_count = shape[1]
    x = rng.integers(-8, 9, size=shape).astype(dtype)
    dy = rng.integers(-8, 9, size=shape).astype(dtype)
    hi, lo, scale, shift, mdy, k = (
        rng.integers(-4, 5, size=c_count).astype(dtype) for _ in range(6)
    )
    lo[:] = 0  # integer data: every product and sum below is exact
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    centered = x64 - hi[None, :, None]
    centers = np.zeros(c_count)
    want_stats = (x64.sum(axis=(0, 2)), (x64**2).sum(axis=(0, 2)))
    want_bsums = (dy64.sum(axis=(0, 2)), (dy64 * centered).sum(axis=(0, 2)))
    want = {name: np.empty_like(x) for name in ("y", "dx", "scaled")}
    hk.normalize_serial(x, hi, lo, scale, shift, want["y"])
    hk.backward_input_serial(dy, x, hi, lo, scale, mdy, k, want["dx"])
    hk.backward_scale_serial(dy, scale, want["scaled"])
    for parts in range(1, 10):
        part = np.zeros((parts, 2, c_count))
        hk.stats_parallel(x, centers, part, np.empty(0))
        for got, expected in zip(part.sum(axis=0), want_stats, strict=True):
            np.testing.assert_array_equal(got, expected, err_msg=f"stats, {parts} chunks")
        hk.backward_sums_parallel(dy, x, hi, lo, part, np.empty(0))
        for got, expected in zip(part.sum(axis=0), want_bsums, strict=True):
            np.testing.assert_array_equal(got, expected, err_msg=f"sums, {parts} chunks")
        got = {name: np.full_like(x, np.nan) for name in want}
        hk.normalize_parallel(x, hi, lo, scale, shift, got["y"], parts)
        hk.backward_input_parallel(dy, x, hi, lo, scale, mdy, k, got["dx"], parts)
        hk.backward_scale_parallel(dy, scale, got["scaled"], parts)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{name}, {parts} chunks")


@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("layout", ["nchw", "channels-last", "2-d", "strided"])
@pytest.mark.parametrize(
    "x_dtype, p_dtype, affine",
    [(np.float32, np.float32, True), (np.float32, np.float64, True),
     (np.float64, np.float32, False), (np.float64, np.float64, True)],
)  # fmt: skip
def test_inference_is_the_eval_forward_on_every_host_path(
    threads, layout, x_dtype, p_dtype, affine, monkeypatch
) -> None:
    """batch_norm_inference's one host kernel (serial, and threaded above the
    threshold) gives the eval forward's bits: float64 running statistics
    with float32 x exercise the mean's low part; statistics far from zero
    would show the uncompensated ``x·scale + shift``; a strided x takes the
    delegated route."""
    monkeypatch.setenv("ARRAYSYNCBN_FAST", "1")
    monkeypatch.setenv("ARRAYSYNCBN_THREADS", threads)
    rng = np.random.default_rng(7)
    shape, axis = {
        "nchw": ((6, 24, 20, 20), 1), "channels-last": ((6, 20, 20, 24), 3),
        "2-d": ((3000, 24), 1), "strided": ((12, 24, 20, 20), 1),
    }[layout]  # fmt: skip
    x = (rng.standard_normal(shape) * 3.0 + 1e4 / 3).astype(x_dtype)
    if layout == "strided":
        x = x[::2]
    c = shape[axis]
    w, b = (rng.standard_normal((2, c)) + 1).astype(p_dtype) if affine else (None, None)
    rm = (1e4 / 3 + rng.standard_normal(c)).astype(p_dtype)
    rv = (9.0 + rng.random(c)).astype(p_dtype)
    if threads == "2":
        monkeypatch.setattr(host, "PARALLEL_MIN_BYTES", 0)
    want = sbn.sync_batch_norm_forward(x, w, b, rm, rv, training=False, axis=axis)[0]
    got = sbn.batch_norm_inference(x, w, b, rm, rv, axis=axis)
    assert got.dtype == x.dtype and got.shape == x.shape
    assert got.tobytes() == want.tobytes()
    ref = ref_forward([x], w, b, rm, rv, training=False, axis=axis).ys[0]
    # A few units of x's precision at |y| ≲ 10 (the forward's bound is the
    # property tests'; here it only says the bits above are the right ones).
    assert np.max(np.abs(got - ref)) < 64 * np.finfo(x_dtype).eps * 10


@pytest.mark.parametrize("shape, axis", [((4, 3, 5), 1), ((6, 3), 1), ((4, 5, 3), -1)])
def test_eval_backward_does_not_read_x(backend, shape, axis) -> None:
    """In eval mode the statistics are constants: dx = scale·dy, whatever x
    holds. The host route computed ``(dy − 0) − (x − mean)·0``, NaN wherever
    x was infinite or NaN, where the portable route, the reference and
    torch give a finite dx (a frozen layer's input gradient)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape)
    x.flat[[0, 5, 7]] = [np.inf, -np.inf, np.nan]
    dy = rng.standard_normal(shape)
    c = shape[axis]
    w, b = rng.random(c) + 0.5, rng.standard_normal(c)
    rm, rv = rng.standard_normal(c), rng.random(c) + 0.5
    ref = ref_forward([x], w, b, rm, rv, training=False, axis=axis)
    want = reference_backward(ref, [dy], w).dxs[0]
    for dtype in backend.dtypes:
        pd = backend.param_dtype(dtype)
        args = [backend.asarray(a, pd) for a in (w, b, rm, rv)]
        with routed(backend):
            _, _, _, saved = sbn.sync_batch_norm_forward(
                backend.asarray(x, dtype), *args, training=False, axis=axis
            )
            dx, _, _ = sbn.sync_batch_norm_backward(backend.asarray(dy, dtype), saved)
        assert saved.route == backend.expected_route(dtype)
        got = to_numpy(dx).astype(np.float64)
        assert np.isfinite(got).all(), (dtype, got)
        np.testing.assert_allclose(got, want, rtol=4 * dtype_eps(dtype), atol=0, err_msg=dtype)


def test_inference_refuses_what_the_forward_refuses(monkeypatch) -> None:
    monkeypatch.setenv("ARRAYSYNCBN_FAST", "1")
    x = np.ones((4, 3, 5), np.float32)
    v = np.ones(3, np.float32)
    with pytest.raises(ValueError, match="running_mean and running_var must both be given"):
        sbn.batch_norm_inference(x, None, None, v, None)
    with pytest.raises(ValueError, match="weight"):
        sbn.batch_norm_inference(x, np.ones(4, np.float32), None, v, v)
    with pytest.raises(ValueError, match="eps"):
        sbn.batch_norm_inference(x, None, None, v, v, eps=-1.0)
    with pytest.raises(TypeError):
        sbn.batch_norm_inference(x.astype(np.int32), None, None, v, v)


@pytest.mark.parametrize("shape, axis", [((8, 16, 32, 32), 1), ((8, 32, 32, 16), 3)])
def test_host_route_allocates_nothing_x_sized_but_y_and_dx(shape, axis, monkeypatch) -> None:
    monkeypatch.setenv("ARRAYSYNCBN_FAST", "1")
    x, dy, params = _data(shape, axis)
    _step(x, dy, *params, axis=axis)  # compile and warm up outside the trace
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        y, _, _, saved = sbn.sync_batch_norm_forward(x, *params, axis=axis)
        fwd_peak = tracemalloc.get_traced_memory()[1] - base
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        dx, _, _ = sbn.sync_batch_norm_backward(dy, saved)
        bwd_peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert saved.route == "host"
    assert fwd_peak <= 1.1 * y.nbytes, (fwd_peak, y.nbytes)
    assert bwd_peak <= 1.1 * dx.nbytes, (bwd_peak, dx.nbytes)


@pytest.mark.parametrize(
    "piece",
    [slice(8, 8), slice(3, 5), slice(0, 16, 2)],
    ids=["empty-slice", "two-samples", "every-other-sample"],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_shards_sliced_from_a_global_batch(piece, channels_last, monkeypatch) -> None:
    """Shards are usually slices of one batch: empty ones, ones whose strides
    on size-1 or zero-size axes are arbitrary, and strided ones (which need
    a copy and so take the portable route). Found by the training demo: an
    empty slice crashed the host route."""
    monkeypatch.setenv("ARRAYSYNCBN_FAST", "1")
    x, dy, params = _data((16, 4, 5, 3), 1)
    if channels_last:
        x, dy = np.moveaxis(x, 1, -1).copy(), np.moveaxis(dy, 1, -1).copy()
    axis = -1 if channels_last else 1
    xs, dys = x[piece], dy[piece]

    def rank(comm):
        mine = (xs, dys) if comm.rank == 0 else (x[:4], dy[:4])
        y, _, _, saved = sbn.sync_batch_norm_forward(mine[0], *params, axis=axis, comm=comm)
        dx, _, _ = sbn.sync_batch_norm_backward(mine[1], saved)
        return y, dx, saved.route

    got = sbn.run_ranks(rank, sbn.thread_group(2))
    whole_x = np.concatenate([xs, x[:4]])
    whole_dy = np.concatenate([dys, dy[:4]])
    monkeypatch.setenv("ARRAYSYNCBN_FAST", "0")
    y, _, _, saved = sbn.sync_batch_norm_forward(whole_x, *params, axis=axis)
    dx, _, _ = sbn.sync_batch_norm_backward(whole_dy, saved)
    n0 = xs.shape[0]
    assert got[1][2] == "host"
    assert got[0][0].shape == xs.shape and got[0][1].shape == xs.shape
    _close(got[0][0], y[:n0])
    _close(got[0][1], dx[:n0])
    _close(got[1][0], y[n0:])
    _close(got[1][1], dx[n0:])


def test_dy_in_another_layout_is_copied_once_per_backward(monkeypatch) -> None:
    """The backward's two kernels read one copy of a dy laid out unlike x, and
    a later backward with the same (since modified) dy array copies it anew."""
    monkeypatch.setenv("ARRAYSYNCBN_FAST", "1")
    x, dy, params = _data((4, 3, 10), 1)
    dy_f = np.asfortranarray(dy)
    copies = []
    real = host.empty_in_layout
    monkeypatch.setattr(host, "empty_in_layout", lambda *a: copies.append(1) or real(*a))
    _, _, _, saved = sbn.sync_batch_norm_forward(x, *params)
    copies.clear()
    dx1, _, _ = sbn.sync_batch_norm_backward(dy_f, saved)
    assert len(copies) == 2, "one copy of dy, one fresh dx"
    dy_f *= 2.0
    dx2, _, _ = sbn.sync_batch_norm_backward(dy_f, saved)
    _close(dx2, 2.0 * dx1)
    monkeypatch.setenv("ARRAYSYNCBN_FAST", "0")
    _close(dx1, _step(x, dy, *params)["dx"])


def test_threaded_kernels_leave_torch_thread_count_alone() -> None:
    """Starting numba's OpenMP pool used to set torch's thread count to numba's
    (torch and numba can share one OpenMP runtime). A fresh process, since
    the pool starts once."""
    import subprocess
    import sys

    pytest.importorskip("torch")
    code = (
        "import torch, numpy as np, arraysyncbn as s\n"
        "from arraysyncbn._fast import host\n"
        "torch.set_num_threads(1); torch.get_num_threads()\n"
        "host.PARALLEL_MIN_BYTES = 0\n"
        "x = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)\n"
        "y, _, _, saved = s.sync_batch_norm_forward(x, None, None, None, None)\n"
        "s.sync_batch_norm_backward(y, saved)\n"
        "assert saved.kern.parts == 2, saved.kern.parts\n"
        "import numba; print(numba.threading_layer(), torch.get_num_threads())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARRAYSYNCBN_")}
    env.update(NUMBA_NUM_THREADS="2", ARRAYSYNCBN_THREADS="2")
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    layer, threads = done.stdout.split()
    assert threads == "1", (layer, threads)


def test_backward_out_laid_out_unlike_x_is_written(monkeypatch) -> None:
    """The forward's bind() checks only its own out=: a backward out= walked
    unlike x crashed inside numba (a review)."""
    monkeypatch.setenv("ARRAYSYNCBN_FAST", "1")
    x, dy, params = _data((4, 3, 10), 1)
    want = _step(x, dy, *params)["dx"]
    *_, saved = sbn.sync_batch_norm_forward(x, *params)
    out = np.asfortranarray(np.full_like(x, np.nan))
    dx, _, _ = sbn.sync_batch_norm_backward(dy, saved, out=out)
    assert dx is out and saved.route == "host"
    _close(out, want)


@pytest.mark.parametrize(
    "dtype", [np.longdouble, np.dtype(">f4"), np.dtype(">f8")], ids=["longdouble", ">f4", ">f8"]
)
def test_parameters_the_kernels_cannot_take_run_the_portable_route(dtype, monkeypatch) -> None:
    """Long double or byte-swapped parameters reached numba (a TypingError)."""
    monkeypatch.setenv("ARRAYSYNCBN_FAST", "1")
    x, dy, params = _data((4, 3, 10), 1)
    odd = tuple(None if p is None else p.astype(dtype) for p in params)
    got = _step(x, dy, *odd)
    want = _step(x, dy, *params)
    assert got["route"] == "portable" and want["route"] == "host"
    assert got["rm"].dtype == np.dtype(dtype)
    for key in ("y", "dx"):
        _close(got[key], want[key])


def test_reduction_kernels_ask_llvm_for_wide_vectors() -> None:
    """The hint reaches LLVM and, on a CPU with AVX-512, the loop runs in
    512-bit registers; its sums stay those of float64. The reduction kernels
    themselves are cached (their IR cannot be inspected), so fresh uncached
    copies of them are compiled here: without their wide_vectors() call the
    hint is gone, whatever a sample kernel shows."""
    import re

    import numba
    from numba.core import codegen

    from arraysyncbn._fast import host_jit

    avx512 = "+avx512f" in codegen.get_host_cpu_features().split(",")

    @numba.njit(fastmath={"reassoc", "contract"})
    def sums(x):
        host_jit.wide_vectors()
        a = 0.0
        for q in range(x.shape[0]):
            a += np.float64(x[q])
        return a

    # Exact in float64 at every partial sum; float32 partial sums lose 2^-20.
    x = np.full(1000, 1 + 2.0**-20, dtype=np.float32)
    assert sums(x) == 1000 * (1 + 2.0**-20)

    x3 = np.ones((2, 3, 64), dtype=np.float32)
    c = np.zeros(3)
    w = np.zeros(3, dtype=np.float32)
    calls = {
        "_stats_planes": (x3, c, 0, 6, c.copy(), c.copy(), np.empty(0)),
        "_stats_rows": (x3[..., :1].copy(), c, 0, 2, c.copy(), c.copy(), np.empty(0)),
        "_bsums_planes": (x3, x3, w, w, 0, 6, c.copy(), c.copy(), np.empty(0)),
        "_bsums_rows": (
            x3[..., :1].copy(),
            x3[..., :1].copy(),
            w,
            w,
            0,
            2,
            c.copy(),
            c.copy(),
            np.empty(0),
        ),
    }
    # Short planes keep LLVM's default width (see host_jit.WIDE_PLANES).
    short = {
        "_stats_short_planes": calls["_stats_planes"],
        "_bsums_short_planes": calls["_bsums_planes"],
    }
    for name, args in short.items():
        fresh = numba.njit(fastmath=host_jit._REDUCE)(getattr(host_jit, name).py_func)
        fresh(*args)
        assert "prefer-vector-width" not in next(iter(fresh.inspect_llvm().values())), name
    for name, args in [("sums", None), *calls.items()]:
        if args is None:
            fresh = sums
        else:
            fresh = numba.njit(fastmath=host_jit._REDUCE)(getattr(host_jit, name).py_func)
            fresh(*args)
        ir = next(iter(fresh.inspect_llvm().values()))
        assert '"prefer-vector-width"="512"' in ir, name
        if avx512:
            asm = next(iter(fresh.inspect_asm().values()))
            assert re.search(r"\bzmm\d", asm), f"{name}: no 512-bit register in its loop"


@pytest.mark.parametrize(
    "x_dtype, param_dtype, stat_dtype",
    [
        ("float32", "float32", "float32"),
        ("float32", "float32", "float64"),
        ("float64", "float64", "float64"),
        ("float64", "float32", "float32"),
        ("float16", "float16", "float16"),
        ("float16", "float32", "float32"),
        ("float32", None, "float32"),
    ],
)
def test_eval_factors_are_the_portable_routes_bit_for_bit(
    x_dtype, param_dtype, stat_dtype, monkeypatch
) -> None:
    """The host route's one-kernel eval factors (mean, invstd, hi, lo, scale,
    shift) repeat the portable route's float64 operations exactly: y and dx
    in eval mode are bitwise the same on both routes."""
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(4, 5, 6)) * 3 + 1e3).astype(x_dtype)
    dy = rng.normal(size=x.shape).astype(x_dtype)
    rm = (rng.normal(size=5) * 1e3 + 1e3 / 3).astype(stat_dtype)
    rv = rng.uniform(0.1, 10.0, size=5).astype(stat_dtype)
    w = b = None
    if param_dtype is not None:
        w = rng.normal(size=5).astype(param_dtype)
        b = rng.normal(size=5).astype(param_dtype)
    got = {}
    for fast in ("1", "0"):
        monkeypatch.setenv("ARRAYSYNCBN_FAST", fast)
        got[fast] = _step(x, dy, w, b, rm, rv, training=False)
    assert got["1"]["route"] == "host" and got["0"]["route"] == "portable"
    for key in ("y", "dx"):
        np.testing.assert_array_equal(got["1"][key], got["0"][key], err_msg=key)


def _bits(a: np.ndarray) -> np.ndarray:
    """``a``'s bit patterns (so that −0 and +0 differ)."""
    return a.view(f"u{a.dtype.itemsize}")


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("training", [False, True])
def test_zeros_without_a_bias_are_positive_on_every_route(dtype, training, monkeypatch) -> None:
    """y where x equals the mean, under a negative weight and no bias:
    ``(x − mean)·scale`` is −0 there, and an absent bias is a bias of 0
    (PyTorch adds it: ``x̂·weight + 0``), so y is +0. The host kernels add
    their zero shift; the portable route added nothing and gave −0. y and
    dx bit for bit alike on both routes, y's signs PyTorch's, its values
    the float64 reference's."""
    x = np.array([[1.0, 4.0], [2.0, 5.0], [2.0, 5.0], [3.0, 6.0]], dtype)
    dy = np.array([[0.5, -1.0], [0.25, 0.0], [-0.75, 2.0], [0.0, -1.0]], dtype)
    w = np.array([-1.5, 2.0], dtype)
    rm, rv = np.array([2.0, 5.0]), np.array([0.5, 2.0])
    got = {}
    for fast in ("1", "0"):
        monkeypatch.setenv("ARRAYSYNCBN_FAST", fast)
        got[fast] = _step(x, dy, w, None, rm.copy(), rv.copy(), training=training)
    assert got["1"]["route"] == "host" and got["0"]["route"] == "portable"
    for key in ("y", "dx"):
        np.testing.assert_array_equal(_bits(got["1"][key]), _bits(got["0"][key]), err_msg=key)
    y = got["0"]["y"]
    assert not np.any(y[1:3]) and not np.any(np.signbit(y[1:3])), y
    ref = ref_forward([x], w, None, rm, rv, training=training)
    np.testing.assert_allclose(y, ref.ys[0], rtol=8 * dtype_eps(dtype), atol=0)
    np.testing.assert_array_equal(np.signbit(y), np.signbit(ref.ys[0]))
    torch = pytest.importorskip("torch")
    want = torch.nn.functional.batch_norm(
        torch.from_numpy(x.astype(np.float64)), torch.from_numpy(rm), torch.from_numpy(rv),
        torch.from_numpy(w.astype(np.float64)), None, training,
    )  # fmt: skip
    # PyTorch's zeros under the negative weight (channel 0; its training
    # mode's x·α + β is not exact elsewhere, so only these are compared).
    zeros = want.numpy()[1:3, 0]
    assert not np.any(zeros) and not np.any(np.signbit(zeros)), zeros


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("training", [False, True])
def test_infinite_means_give_the_portable_routes_bits(dtype, training, monkeypatch) -> None:
    """An infinite mean (running or batch) split into hi + lo: the host
    kernels computed lo = inf − inf = NaN for float64 work, where the
    portable route has no lo (hi holds a float64 mean exactly): y was NaN on
    one route and −inf on the other."""
    x = np.ones((2, 1, 2), dtype)
    if training:
        x[0, 0, 0] = np.inf
    got = {}
    for fast in ("1", "0"):
        monkeypatch.setenv("ARRAYSYNCBN_FAST", fast)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got[fast] = sbn.sync_batch_norm_forward(
                x, None, None, np.array([np.inf]), np.array([1.0]), training=training
            )[0]
    np.testing.assert_array_equal(got["1"], got["0"])


def test_gradient_casts_round_like_numpy_and_overflow_without_a_warning() -> None:
    """dweight and dbias (float64 sums) reach float32 parameters through a
    compiled cast: numpy's rounding bit for bit (ties to even, subnormals,
    ±0, NaN), ±inf on overflow like numpy's cast, and no RuntimeWarning (the
    step judges and warns of non-finite values itself)."""
    tiny = float(np.finfo(np.float32).smallest_subnormal)
    v = np.array(
        [1.0, 1 / 3, -2.5e-8, 1 + 2.0**-24, 1 + 3 * 2.0**-24, 3.4028235e38, 3.4028236e38,
         3.5e38, -1e39, np.inf, -np.inf, np.nan, 0.5 * tiny, 0.51 * tiny, 1e-46, -0.0, 0.0]
    )  # fmt: skip
    v = np.concatenate(
        [v, np.random.default_rng(5).normal(size=200) * 10.0 ** np.arange(-40, 40, 0.4)]
    )
    kern = _fast.host_kernels(_fast.host_io(np.ones((2, 2))))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = kern.cast(v, np.dtype(np.float32))
    with np.errstate(over="ignore"):
        want = v.astype(np.float32)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_gradient_casts_to_half_round_like_torch(half) -> None:
    """On torch's host route, float64 per-channel values (dweight, dbias,
    running statistics) reach float16/bfloat16 through a compiled cast:
    torch's rounding bit for bit (through float32, each step to nearest
    even: double-rounding cases, ties, subnormals, ±0, overflow to ±inf),
    NaN where torch gives NaN."""
    torch = pytest.importorskip("torch")
    tdtype = getattr(torch, half)
    v = np.array(
        [1.0, 1 / 3, -2.5e-8, 1 + 3 * 2.0**-11 - 2.0**-40, 1 + 3 * 2.0**-8 - 2.0**-40,
         1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-8, 1 + 3 * 2.0**-8, 65504.0, 65519.99,
         65520.0 - 2.0**-10, 65520.0, 3.3961776e38, 3.4e38, 3.5e38, -1e39, np.inf, -np.inf,
         np.nan, -np.nan, 2.0**-24, 2.0**-25, 1.5 * 2.0**-25, 2.0**-26, 3 * 2.0**-134,
         2.0**-133, 1e-46, -0.0, 0.0]
    )  # fmt: skip
    v = np.concatenate(
        [v, np.random.default_rng(7).normal(size=300) * 10.0 ** np.arange(-45, 45, 0.3)]
    )
    x = torch.ones(2, 2, dtype=tdtype)
    io = _fast.host_io(x)
    kern = _fast.host_kernels(io)
    target = io.to_numpy(x).dtype
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = io.from_numpy(kern.cast(v, target))
    want = torch.from_numpy(v).to(tdtype)
    assert got.dtype == tdtype and got.shape == want.shape
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    bits = torch.int16
    assert torch.equal(got[~nan].view(bits), want[~nan].view(bits))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_all_finite_sees_every_kind_of_non_finite(dtype) -> None:
    """The lean path's center check (one compiled loop) against numpy's."""
    for bad in (np.nan, np.inf, -np.inf):
        for where in (0, 3, 6):
            v = np.arange(7, dtype=dtype)
            v[where] = bad
            assert not host.all_finite(v)
    assert host.all_finite(np.array([np.finfo(dtype).max, -0.0, np.finfo(dtype).tiny], dtype))
    assert host.all_finite(np.zeros(0, dtype))


_BIG = 1e300


@pytest.mark.parametrize(
    "sums",
    [
        [(3.0, 20.0), (1e20, 1e40)],  # near its center; 1e10 away: a loss, both finite
        [(3.0, 20.0), (4e152, np.inf)],  # a finite mean whose variance overflowed
        [(4e152, np.nan), (1e20, 1e40)],  # inf − inf in the square sums: overflowed too
        [(3.0, 20.0), (np.nan, np.inf)],  # a NaN in the data: no loss, flagged
        [(np.inf, np.inf), (4e152, np.inf)],  # an inf in the data, and an overflow
        [(_BIG, np.inf), (-_BIG, np.inf)],  # (mean ± 2.5e299): finite around 0
    ],
)
@pytest.mark.parametrize("center", [None, 1e10])
def test_finalize_loss_and_verdicts_are_the_portable_routes_bit_for_bit(sums, center) -> None:
    """The loss and the overflow (a finite mean whose variance is not) that
    decide another pass, the channels judged non-finite and the next
    center, from one reduced buffer: the same bits on both routes, so ranks
    on different routes take the same branch. The loss is the finite
    channels' alone: an overflow beside it does not make it infinite."""
    import array_api_compat

    from arraysyncbn.functional import PortableKernels

    n, channels = 4.0, len(sums)
    buf = np.array([n, *(s1 for s1, _ in sums), *(s2 for _, s2 in sums)])
    centers = None if center is None else np.full(channels, center)
    x = np.zeros((2, channels))
    kern = _fast.host_kernels(_fast.host_io(x)).bind(x, 1, None)
    xp = array_api_compat.array_namespace(x)
    rm, rv = np.zeros(channels), np.ones(channels)
    args = (int(n), centers, 1e-5, (None, None, rm, rv), 0.1, 3, np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing from numpy: the step judges overflow
        fast = kern.finalize(buf, *args)
        slow = PortableKernels(xp, 1, xp.float64, "cpu", xp.float64, "cpu").finalize(buf, *args)
    assert fast.loss == slow.loss and np.isfinite(fast.loss), (fast.loss, slow.loss)
    assert fast.overflowed == slow.overflowed
    assert fast.nonfinite == slow.nonfinite
    np.testing.assert_array_equal(fast.center, slow.center)
    np.testing.assert_array_equal(fast.running_var, slow.running_var)
    overflowed = [np.isfinite(s1 / n) and not np.isfinite(s2) for s1, s2 in sums]
    assert fast.overflowed == any(overflowed)
    # The loss of the channels judged finite (here those not overflowed).
    finite = [np.isfinite(s1 / n) and np.isfinite(s2) for s1, s2 in sums]
    assert (fast.loss > 0.0) == any(finite), fast.loss
