"""Bad input gets a clear exception, raised before any communication."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

import arraysyncbn as sbn

from comms import ForbiddenComm


def _x(backend, shape=(4, 3, 2), dtype="float32"):
    return backend.asarray(np.arange(np.prod(shape), dtype=np.float64).reshape(shape), dtype)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_features": 0}, "num_features must be a positive int"),
        ({"num_features": -3}, "num_features must be a positive int"),
        ({"num_features": 3, "eps": 0.0}, "eps must be a positive finite number"),
        ({"num_features": 3, "eps": -1e-5}, "eps must be a positive finite number"),
        ({"num_features": 3, "eps": float("nan")}, "eps must be a positive finite number"),
        ({"num_features": 3, "momentum": 1.5}, r"momentum must be None or a number in \[0, 1\]"),
        ({"num_features": 3, "momentum": -0.1}, r"momentum must be None or a number in \[0, 1\]"),
    ],
)
def test_constructor_rejects_bad_values(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        sbn.SyncBatchNorm(**kwargs)


def test_constructor_rejects_non_communicators() -> None:
    with pytest.raises(TypeError, match="Communicator protocol"):
        sbn.SyncBatchNorm(3, comm=object())


class _MethodRank:
    """rank and size as methods (torch.distributed's spelling), not ints."""

    def rank(self) -> int:
        return 0

    def size(self) -> int:
        return 2

    def allreduce(self, buf, op="sum"):
        return buf


class _Ranked:
    def __init__(self, rank, size) -> None:
        self.rank, self.size = rank, size

    def allreduce(self, buf, op="sum"):
        return buf


def test_rank_and_size_must_be_integers() -> None:
    """Methods (torch.distributed's spelling) and strings are refused, numpy
    integers accepted; every instance is checked, not only a class's first."""
    with pytest.raises(TypeError, match=r"rank and size \(integers\)"):
        sbn.SyncBatchNorm(3, comm=_MethodRank())
    x = np.ones((2, 3), np.float32)
    y = sbn.sync_batch_norm_forward(x, None, None, None, None, comm=_Ranked(np.int64(0), 1))[0]
    np.testing.assert_array_equal(y, np.zeros_like(x))
    with pytest.raises(TypeError, match=r"rank and size \(integers\)"):
        sbn.SyncBatchNorm(3, comm=_Ranked("0", 1))


def test_a_raw_mpi4py_communicator_is_refused_when_the_layer_is_built() -> None:
    """mpi4py's Comm has an int rank and size and an (object) allreduce, so the
    duck-typed check let it through: under mpiexec -n 2 one rank raised
    inside the first allreduce and the other waited forever. In a child
    process: importing mpi4py.MPI initializes MPI."""
    pytest.importorskip("mpi4py")
    code = (
        "from mpi4py import MPI\n"
        "import arraysyncbn as sbn\n"
        "try:\n"
        "    sbn.SyncBatchNorm(3, comm=MPI.COMM_WORLD)\n"
        "except TypeError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "raw mpi4py group (mpi4py.MPI.Intracomm)" in done.stdout, done.stdout
    assert "MPICommunicator(mpi_comm)" in done.stdout


def test_rank_below_two_is_rejected(backend) -> None:
    bn = sbn.SyncBatchNorm(3, comm=ForbiddenComm())
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        bn(backend.asarray(np.ones(3), "float32"))


def test_channel_count_must_match(backend) -> None:
    bn = sbn.SyncBatchNorm(5, comm=ForbiddenComm())
    with pytest.raises(ValueError, match=r"3 channels on axis 1.*num_features=5"):
        bn(_x(backend))
    bn_last = sbn.SyncBatchNorm(3, axis=-1, comm=ForbiddenComm())
    with pytest.raises(ValueError, match="2 channels on axis -1"):
        bn_last(_x(backend))


def test_axis_out_of_range(backend) -> None:
    bn = sbn.SyncBatchNorm(3, axis=3, comm=ForbiddenComm())
    with pytest.raises(ValueError, match="axis 3 is out of range"):
        bn(_x(backend))


def test_non_floating_dtype_is_a_type_error(backend) -> None:
    x = backend.xp.ones((4, 3), dtype=backend.xp.int32, device=backend.device)
    with pytest.raises(TypeError, match="real floating dtype"):
        sbn.SyncBatchNorm(3, comm=ForbiddenComm())(x)
    with pytest.raises(TypeError, match="real floating dtype"):
        sbn.sync_batch_norm_forward(x, None, None, None, None, comm=ForbiddenComm())


def test_non_array_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="x must be an array, got list"):
        sbn.SyncBatchNorm(2)([[1.0, 2.0], [3.0, 4.0]])


def test_mixed_namespaces_are_a_type_error() -> None:
    strict = pytest.importorskip("array_api_strict")
    x = np.ones((4, 3), dtype=np.float32)
    w = strict.ones(3, dtype=strict.float32)
    with pytest.raises(TypeError, match="different array libraries"):
        sbn.sync_batch_norm_forward(x, w, None, None, None, comm=ForbiddenComm())
    bn = sbn.SyncBatchNorm(3)
    bn(x)  # parameters now live in numpy
    bn.comm = ForbiddenComm()
    with pytest.raises(TypeError, match="different array libraries"):
        bn(strict.ones((4, 3), dtype=strict.float32))


def test_mixed_devices_are_a_value_error() -> None:
    strict = pytest.importorskip("array_api_strict")
    x = strict.ones((4, 3), dtype=strict.float32, device=strict.Device("device1"))
    w = strict.ones(3, dtype=strict.float32)
    with pytest.raises(ValueError, match="different devices"):
        sbn.sync_batch_norm_forward(x, w, None, None, None, comm=ForbiddenComm())


def test_functional_rejects_bad_parameters(backend) -> None:
    x = _x(backend)
    good = backend.asarray(np.ones(3), "float32")
    bad = backend.asarray(np.ones(4), "float32")
    f = sbn.sync_batch_norm_forward
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        f(x, bad, None, None, None, comm=ForbiddenComm())
    with pytest.raises(ValueError, match="both be None"):
        f(x, None, None, good, None, comm=ForbiddenComm())
    with pytest.raises(ValueError, match="eps must be"):
        f(x, None, None, None, None, eps=0, comm=ForbiddenComm())
    with pytest.raises(ValueError, match="momentum must be"):
        f(x, None, None, good, good, momentum=2.0, comm=ForbiddenComm())
    with pytest.raises(ValueError, match="num_batches_tracked"):
        f(x, None, None, good, good, num_batches_tracked=-1, comm=ForbiddenComm())


def test_backward_before_forward_is_a_runtime_error() -> None:
    bn = sbn.SyncBatchNorm(3)
    with pytest.raises(sbn.NoForwardError, match="before any forward") as info:
        bn.backward(np.ones((2, 3), dtype=np.float32))
    assert isinstance(info.value, RuntimeError)


def test_dy_shape_must_match_before_communicating(backend) -> None:
    x = _x(backend)
    y, _, _, saved = sbn.sync_batch_norm_forward(x, None, None, None, None)
    saved = dataclasses.replace(saved, comm=ForbiddenComm())
    with pytest.raises(ValueError, match=r"dy has shape \(4, 3, 3\)"):
        sbn.sync_batch_norm_backward(_x(backend, (4, 3, 3)), saved)
    assert tuple(y.shape) == (4, 3, 2)


def test_layer_rejects_input_on_another_device() -> None:
    strict = pytest.importorskip("array_api_strict")
    bn = sbn.SyncBatchNorm(3, xp=strict, device=strict.Device("device1"))
    bn.comm = ForbiddenComm()
    with pytest.raises(ValueError, match="different devices"):
        bn(strict.ones((4, 3), dtype=strict.float32))


def test_dy_from_another_library_is_a_type_error() -> None:
    strict = pytest.importorskip("array_api_strict")
    bn = sbn.SyncBatchNorm(3)
    bn(np.ones((4, 3), dtype=np.float32) * np.arange(4, dtype=np.float32)[:, None])
    with pytest.raises(TypeError):
        bn.backward(strict.ones((4, 3), dtype=strict.float32))


def test_saved_must_come_from_a_forward() -> None:
    with pytest.raises(TypeError, match="SavedForBackward"):
        sbn.sync_batch_norm_backward(np.ones((2, 2)), object())


# -- wrong types are TypeErrors, wrong values ValueErrors (issue 7, item 6) -----------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_features": 2.0}, "num_features must be an int, got float"),
        ({"num_features": True}, "num_features must be an int, got bool"),
        ({"num_features": "3"}, "num_features must be an int, got str"),
        ({"num_features": None}, "num_features must be an int, got NoneType"),
        ({"num_features": 3, "eps": "1e-5"}, "eps must be a real number, got str"),
        ({"num_features": 3, "eps": None}, "eps must be a real number, got NoneType"),
        ({"num_features": 3, "eps": True}, "eps must be a real number, got bool"),
        ({"num_features": 3, "momentum": "0.1"}, "momentum must be None or a real number"),
        ({"num_features": 3, "momentum": False}, "momentum must be None or a real number"),
    ],
)
def test_constructor_rejects_bad_types(kwargs, match) -> None:
    with pytest.raises(TypeError, match=match):
        sbn.SyncBatchNorm(**kwargs)


def test_constructor_accepts_numpy_scalars() -> None:
    bn = sbn.SyncBatchNorm(np.int64(3), eps=np.float32(1e-3), momentum=np.float64(0.5))
    assert bn.num_features == 3 and isinstance(bn.num_features, int)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"eps": None}, TypeError, "eps must be a real number"),
        ({"eps": "1e-5"}, TypeError, "eps must be a real number"),
        ({"eps": float("inf")}, ValueError, "eps must be a positive finite number"),
        ({"momentum": "0.1"}, TypeError, "momentum must be None or a real number"),
        ({"momentum": True}, TypeError, "momentum must be None or a real number"),
        ({"momentum": float("nan")}, ValueError, "momentum must be None or a number in"),
        ({"num_batches_tracked": 1.0}, TypeError, "num_batches_tracked must be an int"),
        ({"num_batches_tracked": True}, TypeError, "num_batches_tracked must be an int"),
        ({"num_batches_tracked": None}, TypeError, "num_batches_tracked must be an int"),
        ({"num_batches_tracked": "1"}, TypeError, "num_batches_tracked must be an int"),
        ({"num_batches_tracked": -1}, ValueError, "num_batches_tracked must be a non-negative"),
    ],
)
def test_functional_separates_bad_types_from_bad_values(backend, kwargs, error, match) -> None:
    x = _x(backend)
    rs = backend.asarray(np.ones(3), "float32")
    with pytest.raises(error, match=match):
        sbn.sync_batch_norm_forward(x, None, None, rs, rs, comm=ForbiddenComm(), **kwargs)


def test_layer_passes_a_bad_count_on_as_a_type_error() -> None:
    bn = sbn.SyncBatchNorm(3, comm=ForbiddenComm())
    bn.num_batches_tracked = 2.5
    with pytest.raises(TypeError, match="num_batches_tracked must be an int"):
        bn(np.ones((4, 3), dtype=np.float32))


def test_backward_of_none_is_a_type_error(backend) -> None:
    x = _x(backend)
    with pytest.raises(TypeError, match="dy must be an array, got NoneType"):
        sbn.SyncBatchNorm(3).backward(None)  # before any forward, too
    bn = sbn.SyncBatchNorm(3)
    bn(x)
    with pytest.raises(TypeError, match="dy must be an array, got NoneType"):
        bn.backward(None)
    _, _, _, saved = sbn.sync_batch_norm_forward(x, None, None, None, None)
    with pytest.raises(TypeError, match="dy must be an array, got NoneType"):
        sbn.sync_batch_norm_backward(None, saved)
    with pytest.raises(TypeError, match="dy must be an array, got list"):
        sbn.sync_batch_norm_backward([[1.0]], saved)


# -- found by an adversarial review ---------------------------------------------------
def test_out_overlapping_x_is_rejected(backend) -> None:
    """y written over x would leave the backward reading y as x: silently wrong
    gradients (found: dx off by 0.5)."""
    x = _x(backend)
    for out in (x, x[...]):
        with pytest.raises(ValueError, match="shares memory with x"):
            sbn.sync_batch_norm_forward(x, None, None, None, None, out=out, comm=ForbiddenComm())


@pytest.mark.parametrize("shifted", ["x", "dy"])
def test_dx_out_shifted_against_x_or_dy_gets_the_right_dx(backend, shifted: str) -> None:
    """The host kernel wrote dx[i] while still reading x and dy elsewhere: an
    out= one sample ahead of x or dy (views of one buffer) silently got dx
    off by up to 5 (the portable route, which copies at the end, was right)."""
    from arraysyncbn.testing import to_numpy

    rng = np.random.default_rng(5)
    base, other = rng.normal(size=(5, 3, 4)), rng.normal(size=(4, 3, 4))

    def dx_of(x, dy, out=None):
        *_, saved = sbn.sync_batch_norm_forward(x, None, None, None, None)
        return to_numpy(sbn.sync_batch_norm_backward(dy, saved, out=out)[0])

    values = {"x": base[:4], "dy": other} if shifted == "x" else {"x": other, "dy": base[:4]}
    want = dx_of(*(backend.asarray(values[k], "float32") for k in ("x", "dy")))
    buf = backend.asarray(base, "float32")
    args = {k: backend.asarray(v, "float32") for k, v in values.items()}
    args[shifted] = buf[:4, ...]
    got = dx_of(args["x"], args["dy"], out=buf[1:, ...])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("over", ["dy", "x", "dy shifted against x"])
def test_dx_written_over_dy_or_x_itself(backend, over: str) -> None:
    """out=dy and out=x (the documented in-place cases) give the dx of a
    fresh out; so does out=dy where dy is a view one sample ahead of x, which
    the host kernel must not be handed (out still overlaps x unlike)."""
    from arraysyncbn.testing import to_numpy

    rng = np.random.default_rng(6)
    base, grad = rng.normal(size=(5, 3, 4)), rng.normal(size=(4, 3, 4))
    if over == "dy shifted against x":
        values = {"x": base[:4], "dy": base[1:]}
    else:
        values = {"x": base[:4], "dy": grad}

    def dx_of(x, dy, out=None):
        *_, saved = sbn.sync_batch_norm_forward(x, None, None, None, None)
        return to_numpy(sbn.sync_batch_norm_backward(dy, saved, out=out)[0])

    want = dx_of(*(backend.asarray(values[k], "float32") for k in ("x", "dy")))
    if over == "dy shifted against x":
        buf = backend.asarray(base, "float32")
        x, dy = buf[:4, ...], buf[1:, ...]
    else:
        x, dy = (backend.asarray(values[k], "float32") for k in ("x", "dy"))
    got = dx_of(x, dy, out=x if over == "x" else dy)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_read_only_out_is_a_value_error() -> None:
    x = np.arange(24.0).reshape(4, 3, 2)
    out = np.empty_like(x)
    out.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        sbn.sync_batch_norm_forward(x, None, None, None, None, out=out)
    *_, saved = sbn.sync_batch_norm_forward(x, None, None, None, None)
    with pytest.raises(ValueError, match="read-only"):
        sbn.sync_batch_norm_backward(np.ones_like(x), saved, out=out)


def test_a_zero_d_integer_count_is_taken_as_its_value() -> None:
    """``num_batches_tracked`` straight from a module's buffer (a 0-d tensor) used
    to reach the compiled kernels unconverted (a numba TypingError)."""
    torch = pytest.importorskip("torch")
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    got = sbn.sync_batch_norm_forward(
        x, None, None, rm, rv, momentum=None, num_batches_tracked=torch.tensor(3)
    )
    want = sbn.sync_batch_norm_forward(x, None, None, rm, rv, momentum=None, num_batches_tracked=3)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


def test_a_non_finite_center_is_a_value_error(backend) -> None:
    x = _x(backend)
    center = backend.asarray(np.array([0.0, np.nan, 1.0]), "float32")
    with pytest.raises(ValueError, match="center must be finite"):
        sbn.sync_batch_norm_forward(x, None, None, None, None, center=center, comm=ForbiddenComm())


def test_training_must_be_a_bool(backend) -> None:
    with pytest.raises(TypeError, match="training must be a bool"):
        sbn.sync_batch_norm_forward(_x(backend), None, None, None, None, training="no")


def test_run_ranks_needs_every_rank_of_the_group() -> None:
    """A rank left out would leave the others waiting until the timeout."""
    comms = sbn.thread_group(2, timeout=30)
    with pytest.raises(ValueError, match="every rank of one thread_group"):
        sbn.run_ranks(lambda c: c.allreduce(np.ones(2)), comms[:1])
    with pytest.raises(ValueError, match="every rank of one thread_group"):
        sbn.run_ranks(lambda c: None, [comms[0], sbn.thread_group(2)[1]])


def test_an_int16_tensor_is_not_taken_for_bfloat16_bits() -> None:
    """bfloat16 tensors reach the host kernels as int16 views of their bits; a
    real int16 parameter must still be refused as non-floating."""
    torch = pytest.importorskip("torch")
    x = torch.randn(4, 3, 2).to(torch.bfloat16)
    with pytest.raises(TypeError, match="weight must have a real floating dtype"):
        sbn.sync_batch_norm_forward(x, torch.ones(3, dtype=torch.int16), None, None, None)
    *_, saved = sbn.sync_batch_norm_forward(x, None, None, None, None)
    with pytest.raises(TypeError, match="dy must have a real floating dtype"):
        sbn.sync_batch_norm_backward(torch.ones(4, 3, 2, dtype=torch.int16), saved)


def test_a_non_finite_bfloat16_center_is_refused_on_the_lean_path_too() -> None:
    """The lean check read bfloat16's bits (int16), which are always 'finite'."""
    torch = pytest.importorskip("torch")
    x = torch.randn(4, 3, 5)
    center = torch.tensor([0.0, float("nan"), float("inf")]).bfloat16()
    with pytest.raises(ValueError, match="center must be finite"):
        sbn.sync_batch_norm_forward(x, None, None, None, None, center=center)


def test_torch_overlap_is_judged_by_bytes_not_by_storage() -> None:
    """Disjoint slices of one buffer do not overlap; the same slice does."""
    torch = pytest.importorskip("torch")
    from arraysyncbn.functional import _shares_memory

    buf = torch.zeros(2, 4, 3, 5)
    assert not _shares_memory(buf[0], buf[1])
    assert _shares_memory(buf[0], buf[0][:, :2])
    assert _shares_memory(buf[:, 0], buf[1])
    # Interleaved but disjoint: judged by bounds, like numpy's may_share_memory.
    assert _shares_memory(buf[0, :, 0], buf[0, :, 1])
