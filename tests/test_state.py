"""state_dict / load_state_dict, lazy creation and PyTorch interchange."""

from __future__ import annotations

import array_api_compat
import numpy as np
import pytest

import arraysyncbn as sbn
from arraysyncbn.testing import assert_close_to_reference, assert_like, to_numpy


def _state(c: int = 3) -> dict:
    return {
        "weight": np.linspace(0.5, 1.5, c),
        "bias": np.linspace(-1, 1, c),
        "running_mean": np.linspace(-0.3, 0.3, c),
        "running_var": np.linspace(0.5, 2.0, c),
        "num_batches_tracked": np.array(5, dtype=np.int64),
    }


def test_state_dict_has_pytorch_keys(backend) -> None:
    bn = sbn.SyncBatchNorm(3)
    bn(backend.asarray(np.random.default_rng(0).normal(size=(4, 3)), "float32"))
    sd = bn.state_dict()
    assert list(sd) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert int(sd["num_batches_tracked"]) == 1
    assert set(sbn.SyncBatchNorm(3, affine=False, xp=np).state_dict()) == {
        "running_mean",
        "running_var",
        "num_batches_tracked",
    }
    assert set(sbn.SyncBatchNorm(3, track_running_stats=False, xp=np).state_dict()) == {
        "weight",
        "bias",
    }


def test_round_trip_between_layers(backend) -> None:
    x = backend.asarray(np.random.default_rng(1).normal(size=(6, 3, 2)), "float32")
    a = sbn.SyncBatchNorm(3, momentum=0.5)
    a(x)
    a(x)
    b = sbn.SyncBatchNorm(3)
    b.load_state_dict(a.state_dict())
    a.eval()
    b.eval()
    assert np.array_equal(to_numpy(a(x)), to_numpy(b(x)))
    assert b.num_batches_tracked == 2


def test_load_before_first_forward_lands_on_the_input_device(backend) -> None:
    bn = sbn.SyncBatchNorm(3)
    bn.load_state_dict(_state())
    bn.eval()
    x = backend.asarray(np.ones((2, 3)), "float32")
    y = bn(x)
    assert bn.num_batches_tracked == 5
    s = _state()
    want = (1.0 - s["running_mean"]) / np.sqrt(s["running_var"] + 1e-5) * s["weight"] + s["bias"]
    assert_close_to_reference(y, np.broadcast_to(want, (2, 3)), 1e-5)
    from arraysyncbn.testing import assert_like

    assert_like(bn.running_var, backend.xp.zeros(3, dtype=x.dtype, device=backend.device))


def test_load_rejects_missing_unexpected_and_misshaped() -> None:
    bn = sbn.SyncBatchNorm(3, xp=np)
    state = _state()
    del state["bias"]
    with pytest.raises(ValueError, match=r"missing keys \['bias'\]"):
        bn.load_state_dict(state)
    state = _state()
    state["extra"] = np.zeros(3)
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        bn.load_state_dict(state)
    state = _state()
    state["running_var"] = np.ones(4)
    with pytest.raises(ValueError, match=r"'running_var' has shape \(4,\), expected \(3,\)"):
        bn.load_state_dict(state)
    state = _state()
    state["num_batches_tracked"] = np.array(1.5)
    with pytest.raises(TypeError, match="integer"):
        bn.load_state_dict(state)
    state["num_batches_tracked"] = 2.0
    with pytest.raises(TypeError, match="int"):
        bn.load_state_dict(state)
    state["num_batches_tracked"] = np.array([1, 2])
    with pytest.raises(ValueError, match="scalar"):
        bn.load_state_dict(state)


def test_state_dict_before_creation_explains() -> None:
    with pytest.raises(RuntimeError, match="first forward"):
        sbn.SyncBatchNorm(3).state_dict()


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_state_dict_after_a_load_before_the_first_forward_gives_back_the_load(library) -> None:
    """Load then save, no forward between (a checkpoint converted): the
    loaded values come back, in their library and dtype, with the count as a
    0-d int64 array beside them; a torch BatchNorm2d takes it strictly, and
    the layer's first forward still uses them."""
    rng = np.random.default_rng(5)
    values = {
        "weight": rng.normal(size=3),
        "bias": rng.normal(size=3),
        "running_mean": rng.normal(size=3),
        "running_var": rng.uniform(0.5, 2.0, size=3),
    }
    if library == "torch":
        torch = pytest.importorskip("torch")
        state = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in values.items()}
        state["num_batches_tracked"] = torch.tensor(7)
    else:
        state = {k: v.astype(np.float32) for k, v in values.items()}
        state["num_batches_tracked"] = 7
    bn = sbn.SyncBatchNorm(3)
    bn.load_state_dict(state)
    saved = bn.state_dict()
    assert list(saved) == list(state)
    for key in values:
        assert type(saved[key]) is type(state[key]) and saved[key].dtype == state[key].dtype
        np.testing.assert_array_equal(to_numpy(saved[key]), to_numpy(state[key]))
    count = saved["num_batches_tracked"]
    assert int(count) == 7 and tuple(count.shape) == () and "int64" in str(count.dtype)
    if library == "torch":
        plain = torch.nn.BatchNorm2d(3).to(torch.bfloat16)
        plain.load_state_dict(saved, strict=True)
        assert int(plain.num_batches_tracked) == 7
    bn.eval()
    x = np.ones((2, 3), dtype=np.float32)
    y = bn(x)
    want = np.empty((2, 3), dtype=np.float32)
    sbn.sync_batch_norm_forward(
        x, *(to_numpy(state[k]).astype(np.float32) for k in values), training=False, out=want
    )
    np.testing.assert_array_equal(y, want)
    sbn.SyncBatchNorm(3).load_state_dict(bn.state_dict())  # and it loads back


def test_the_state_before_the_first_forward_is_a_copy() -> None:
    """Edits of the returned dict change neither the layer nor what its first
    forward loads (a negative variance would slip past the load's checks)."""
    bn = sbn.SyncBatchNorm(3)
    ones, zeros = np.ones(3), np.zeros(3)
    bn.load_state_dict(
        {"weight": ones, "bias": zeros, "running_mean": zeros, "running_var": ones,
         "num_batches_tracked": 0}
    )  # fmt: skip
    saved = bn.state_dict()
    saved["weight"][0], saved["running_var"][1] = 100.0, -5.0
    np.testing.assert_array_equal(bn.state_dict()["weight"], ones)
    bn.eval()
    np.testing.assert_allclose(bn(np.zeros((2, 3))), 0.0)  # runs: the variance stayed 1


def test_xp_and_device_create_parameters_now() -> None:
    strict = pytest.importorskip("array_api_strict")
    dev = strict.Device("device1")
    bn = sbn.SyncBatchNorm(4, xp=strict, device=dev, dtype="float64")
    assert bn.weight.dtype == strict.float64
    assert bn.running_mean.device == dev


def test_torch_batchnorm2d_state_dict_converted_to_numpy_loads_as_is() -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    ref = torch.nn.BatchNorm2d(3, momentum=0.2)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2.0)
        ref.bias.uniform_(-1.0, 1.0)
    for _ in range(3):
        ref(torch.randn(4, 3, 5, 5) * 2 + 1)
    ref.eval()
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    bn = sbn.SyncBatchNorm(3, momentum=0.2)
    bn.load_state_dict(state)
    bn.eval()
    x = torch.randn(2, 3, 5, 5)
    y = bn(x.numpy())
    assert bn.num_batches_tracked == 3
    assert_close_to_reference(y, ref(x).detach().numpy().astype(np.float64), 1e-5)


# -- a layer built with xp=, atomic loads, hidden state (issue 7, item 1) -------------
def _namespaces() -> list:
    params = [pytest.param(np, id="numpy")]
    try:
        import array_api_strict
    except ImportError:
        return params
    return [*params, pytest.param(array_api_strict, id="strict")]


def _sources(state: dict) -> list[tuple[str, dict]]:
    """The same state as numpy arrays and, where torch is installed, torch tensors."""
    out = [("numpy", state)]
    try:
        import torch
    except ImportError:
        return out
    return [*out, ("torch", {k: torch.as_tensor(np.asarray(v)) for k, v in state.items()})]


@pytest.mark.parametrize("xp", _namespaces())
@pytest.mark.parametrize("after_forward", [False, True], ids=["fresh", "after-forward"])
def test_load_into_a_layer_built_with_xp(xp, after_forward: bool) -> None:
    bn = sbn.SyncBatchNorm(3, xp=xp)
    x = xp.asarray(np.random.default_rng(2).normal(size=(4, 3)).astype(np.float32))
    if after_forward:
        bn(x)
    bn.load_state_dict(bn.state_dict())  # our own state dict
    for name, state in _sources(_state()):
        bn.load_state_dict(state)
        assert bn.num_batches_tracked == 5, name
        assert_close_to_reference(bn.running_var, _state()["running_var"], 1e-7)
        bn.eval()
        y = bn(x)
        bn.train()
        s = _state()
        want = (to_numpy(x) - s["running_mean"]) / np.sqrt(s["running_var"] + 1e-5)
        assert_close_to_reference(y, want * s["weight"] + s["bias"], 1e-5)


@pytest.mark.parametrize(
    ("key", "value", "error", "match"),
    [
        ("running_var", np.array([1.0, np.nan, 1.0]), ValueError, "non-finite"),
        ("running_var", np.array([1.0, -0.5, 1.0]), ValueError, "negative"),
        ("weight", np.array([1.0, np.inf, 1.0]), ValueError, "non-finite"),
        ("bias", np.array([0.0, 1e300, 0.0]), ValueError, "non-finite"),  # inf in float32
        ("running_var", np.array([1.0, 1.0]), ValueError, "shape"),
        ("running_var", np.array(["a", "b", "c"]), TypeError, "real dtype"),
        ("num_batches_tracked", np.array(-1), ValueError, "non-negative"),
        ("num_batches_tracked", 2.0, TypeError, "integer|int"),
    ],
)
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_load_is_atomic_and_rejects_bad_values(key: str, value, error, match: str) -> None:
    """A bad entry late in the dict leaves every earlier entry as it was."""
    bn = sbn.SyncBatchNorm(3, xp=np)
    bn(np.random.default_rng(3).normal(size=(4, 3)).astype(np.float32))
    before = {k: np.array(v) for k, v in bn.state_dict().items()}
    state = _state()
    state[key] = value
    with pytest.raises(error, match=match):
        bn.load_state_dict(state)
    after = bn.state_dict()
    for k, v in before.items():
        assert np.array_equal(np.asarray(after[k]), v), k
    assert bn.running_mean.dtype == np.float32 and bn.num_batches_tracked == 1


def test_load_before_the_first_forward_rejects_bad_values_at_once() -> None:
    bn = sbn.SyncBatchNorm(3)
    state = _state()
    state["running_var"] = np.array([1.0, np.nan, 1.0])
    with pytest.raises(ValueError, match="non-finite"):
        bn.load_state_dict(state)
    bn(np.ones((2, 3), dtype=np.float32))  # defaults, nothing of the bad dict
    assert bn.num_batches_tracked == 1


def test_load_before_the_first_forward_keeps_a_copy() -> None:
    bn = sbn.SyncBatchNorm(3)
    state = _state()
    bn.load_state_dict(state)
    state["running_mean"][:] = 99.0  # the caller reuses its buffer
    bn.eval()
    bn(np.ones((2, 3), dtype=np.float32))
    assert_close_to_reference(bn.running_mean, _state()["running_mean"], 1e-7)


def test_load_forgets_the_last_forward_and_the_merge_center() -> None:
    """After a load the layer behaves exactly like a fresh layer given the same
    state: no merge center left from old statistics, nothing to differentiate."""
    rng = np.random.default_rng(4)
    old = (1e3 + rng.normal(size=(8, 3))).astype(np.float64)
    new = (5e2 + rng.normal(size=(8, 3))).astype(np.float64)
    used = sbn.SyncBatchNorm(3, xp=np, dtype="float64")
    used(old)
    used.load_state_dict(_state())
    assert used._center is None and used._center_comm is None and used._saved is None
    with pytest.raises(sbn.NoForwardError):
        used.backward(np.ones((8, 3)))
    fresh = sbn.SyncBatchNorm(3, xp=np, dtype="float64")
    fresh.load_state_dict(_state())
    assert np.array_equal(to_numpy(used(new)), to_numpy(fresh(new)))
    assert np.array_equal(to_numpy(used.running_var), to_numpy(fresh.running_var))


# -- PyTorch interchange, both ways (issue 7, item 2) ---------------------------------
def test_state_dict_loads_into_torch_strictly_and_back() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    bn = sbn.SyncBatchNorm(3, momentum=0.3)
    for _ in range(2):
        bn(rng.normal(1.0, 2.0, size=(4, 3, 5, 5)).astype(np.float32))
    sd = bn.state_dict()
    assert sd["num_batches_tracked"].dtype == np.int64 and sd["num_batches_tracked"].shape == ()
    ref = torch.nn.BatchNorm2d(3)
    ref.load_state_dict({k: torch.as_tensor(v) for k, v in sd.items()}, strict=True)
    assert int(ref.num_batches_tracked) == 2
    assert torch.equal(ref.running_var, torch.as_tensor(sd["running_var"]))
    # Back: torch tensors (not numpy) into layers built either way.
    for back in (sbn.SyncBatchNorm(3, xp=np), sbn.SyncBatchNorm(3)):
        back.load_state_dict(ref.state_dict())
        back.eval()
        bn.eval()
        x = rng.normal(size=(2, 3, 5, 5)).astype(np.float32)
        assert np.array_equal(to_numpy(back(x)), to_numpy(bn(x)))
        assert back.num_batches_tracked == 2


def test_state_dict_count_is_a_0d_int64_array_of_the_layer_namespace(backend) -> None:
    bn = sbn.SyncBatchNorm(3)
    bn(backend.asarray(np.random.default_rng(6).normal(size=(4, 3)), "float32"))
    count = bn.state_dict()["num_batches_tracked"]
    assert_like(count, backend.xp.zeros((), dtype=backend.xp.int64, device=backend.device))
    assert int(count) == 1 and isinstance(bn.num_batches_tracked, int)


@pytest.mark.parametrize("module", ["array", "torch"])
def test_a_load_on_some_ranks_only_still_gives_the_global_statistics(module) -> None:
    """Each layer merges around its last reduced mean. Loading a state on
    rank 0 only clears rank 0's center while rank 1 keeps its own; the
    sums then mix centers. Every rank must notice (from the reduced buffer)
    and merge again, giving the whole batch's statistics, now and at later
    steps."""
    rng = np.random.default_rng(11)
    batches = [rng.normal(50.0, 2.0, size=(6, 3, 4)) for _ in range(3)]
    # Identity affine parameters, so that only the state behind them differs.
    state = {**_state(), "weight": np.ones(3), "bias": np.zeros(3)}
    sizes = (2, 4)
    comms = sbn.thread_group(2)
    if module == "torch":
        torch = pytest.importorskip("torch")
        from arraysyncbn.torch import SyncBatchNorm

        layers = [SyncBatchNorm(3, dtype=torch.float64, comm=k) for k in comms]

        def step(layer, x):
            return layer(torch.from_numpy(x)).detach().numpy()

        def load(layer):
            layer.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})

        def running(layer):
            return layer.running_mean.numpy().copy()
    else:
        layers = [sbn.SyncBatchNorm(3, xp=np, dtype="float64", comm=k) for k in comms]

        def step(layer, x):
            return to_numpy(layer(x))

        def load(layer):
            layer.load_state_dict(state)

        def running(layer):
            return to_numpy(layer.running_mean).copy()

    def rank(comm):
        out = []
        for i, x in enumerate(batches):
            if i == 1 and comm.rank == 0:
                load(layers[0])  # rank 0 only
            shard = np.split(x, np.cumsum(sizes)[:-1])[comm.rank]
            out.append((step(layers[comm.rank], shard), running(layers[comm.rank])))
        return out

    got = sbn.run_ranks(rank, comms)
    for i, x in enumerate(batches):
        mean, std = x.mean(axis=(0, 2)), x.std(axis=(0, 2))
        whole = (x - mean[:, None]) / np.sqrt(std[:, None] ** 2 + 1e-5)
        y = np.concatenate([got[r][i][0] for r in range(2)])
        np.testing.assert_allclose(y, whole, rtol=0, atol=1e-9, err_msg=f"step {i}")
    # Before the load the ranks hold the same running statistics (after it,
    # rank 0's started from the loaded ones).
    assert np.array_equal(got[0][0][1], got[1][0][1])


# -- half-precision torch state dicts ---------------------------------------------------
@pytest.mark.parametrize("xp", _namespaces())
@pytest.mark.parametrize("dtype", ["float32", "float64", None], ids=["f32", "f64", "lazy"])
@pytest.mark.parametrize("half", ["bfloat16", "float16"])
def test_a_half_precision_torch_state_dict_loads_exactly(xp, dtype, half: str) -> None:
    """numpy and array-api-strict have no bfloat16: its values are widened
    (exactly) to float32 and land in the layer's dtype like any other's."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    ref = torch.nn.BatchNorm2d(3).to(getattr(torch, half))
    with torch.no_grad():
        for t in (ref.weight, ref.bias, ref.running_mean, ref.running_var):
            t.uniform_(0.1, 3.0)
    state = ref.state_dict()
    if dtype is None:  # built at the first forward, in the input's dtype
        bn = sbn.SyncBatchNorm(3)
        bn.load_state_dict(state)
        bn.eval()(xp.ones((2, 3), dtype=xp.float32))
    else:
        bn = sbn.SyncBatchNorm(3, xp=xp, dtype=dtype)
        bn.load_state_dict(state)
    want = getattr(xp, dtype or "float32")
    for key in ("weight", "bias", "running_mean", "running_var"):
        value = getattr(bn, key)
        assert array_api_compat.array_namespace(value) is array_api_compat.array_namespace(
            xp.zeros(0)
        )
        assert value.dtype == want, key
        exact = state[key].double().numpy()
        assert np.array_equal(to_numpy(value).astype(np.float64), exact), key
    assert bn.num_batches_tracked == 0
