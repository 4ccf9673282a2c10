"""state_dict / load_state_dict, lazy creation and PyTorch interchange."""

from __future__ import annotations

import numpy as np
import pytest

import arraysyncbn as sbn
from arraysyncbn.testing import assert_close_to_reference, to_numpy


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
    assert sd["num_batches_tracked"] == 1
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
    with pytest.raises(ValueError, match="integer"):
        bn.load_state_dict(state)
    state["num_batches_tracked"] = 2.0
    with pytest.raises(ValueError, match="integer"):
        bn.load_state_dict(state)
    state["num_batches_tracked"] = np.array([1, 2])
    with pytest.raises(ValueError, match="scalar"):
        bn.load_state_dict(state)


def test_state_dict_before_creation_explains() -> None:
    with pytest.raises(RuntimeError, match="first forward"):
        sbn.SyncBatchNorm(3).state_dict()


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
