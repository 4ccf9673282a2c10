"""PyTorch as an independent oracle: F.batch_norm on the concatenated batch."""

from __future__ import annotations

import numpy as np
import pytest

import arraysyncbn as sbn
from arraysyncbn.testing import assert_close_to_reference, to_numpy

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("sizes", [(3, 5), (0, 4, 1), (2, 2, 2, 2)])
def test_outputs_gradients_and_running_stats_match_torch(dtype, channels_last, sizes) -> None:
    tdt = getattr(torch, dtype)
    tol = 2e-5 if dtype == "float32" else 1e-10
    gen = torch.Generator().manual_seed(sum(sizes))
    c = 3
    weight = torch.rand(c, generator=gen, dtype=tdt) + 0.5
    bias = torch.randn(c, generator=gen, dtype=tdt)
    ref_rm, ref_rv = torch.zeros(c, dtype=tdt), torch.ones(c, dtype=tdt)
    layers = None
    for step in range(3):
        xs = [torch.randn(n, c, 4, 3, generator=gen, dtype=tdt) * 3 + step for n in sizes]
        dys = [torch.randn(x.shape, generator=gen, dtype=tdt) for x in xs]
        if channels_last:
            xs_in = [x.movedim(1, -1).contiguous() for x in xs]
            dys_in = [d.movedim(1, -1).contiguous() for d in dys]
        else:
            xs_in, dys_in = xs, dys

        full = torch.cat(xs).requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        b = bias.clone().requires_grad_(True)
        y_ref = torch.nn.functional.batch_norm(full, ref_rm, ref_rv, w, b, True, 0.1, 1e-5)
        y_ref.backward(torch.cat(dys))

        comms = sbn.thread_group(len(sizes))
        if layers is None:
            layers = [sbn.SyncBatchNorm(c, axis=-1 if channels_last else 1, comm=k) for k in comms]
            for layer in layers:
                layer.load_state_dict(
                    {
                        "weight": weight,
                        "bias": bias,
                        "running_mean": torch.zeros(c, dtype=tdt),
                        "running_var": torch.ones(c, dtype=tdt),
                        "num_batches_tracked": 0,
                    }
                )
        for layer, comm in zip(layers, comms, strict=True):
            layer.comm = comm

        def rank(comm, xs_in=xs_in, dys_in=dys_in, layers=layers):
            layer = layers[comm.rank]
            y = layer(xs_in[comm.rank])
            dx = layer.backward(dys_in[comm.rank])
            return y, dx, layer.grad_weight, layer.grad_bias

        results = sbn.run_ranks(rank, comms)
        ys = [r[0] if not channels_last else r[0].movedim(-1, 1) for r in results]
        dxs = [r[1] if not channels_last else r[1].movedim(-1, 1) for r in results]
        assert all(r[0].dtype == tdt for r in results)
        assert_close_to_reference(torch.cat(ys), to_numpy(y_ref), tol, name="y")
        assert_close_to_reference(torch.cat(dxs), to_numpy(full.grad), tol * 10, name="dx")
        gw = sum(to_numpy(r[2]).astype(np.float64) for r in results)
        gb = sum(to_numpy(r[3]).astype(np.float64) for r in results)
        assert_close_to_reference(gw, to_numpy(w.grad), tol * 100, name="grad_weight")
        assert_close_to_reference(gb, to_numpy(b.grad), tol * 100, name="grad_bias")
        for layer in layers:
            assert_close_to_reference(layer.running_mean, to_numpy(ref_rm), tol, name="rm")
            assert_close_to_reference(layer.running_var, to_numpy(ref_rv), tol, name="rv")


def test_half_precision_matches_torch_on_float32_compute() -> None:
    gen = torch.Generator().manual_seed(0)
    for tdt, tol in ((torch.float16, 4e-3), (torch.bfloat16, 3e-2)):
        x = (torch.randn(8, 4, 6, generator=gen) * 2 + 1).to(tdt)
        bn = sbn.SyncBatchNorm(4)
        y = bn(x)
        assert y.dtype == tdt and bn.weight.dtype == torch.float32
        y_ref = torch.nn.functional.batch_norm(
            x.float(), torch.zeros(4), torch.ones(4), None, None, True, 0.1, 1e-5
        )
        assert_close_to_reference(y, to_numpy(y_ref), tol * 4)
