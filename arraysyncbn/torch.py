"""PyTorch adapter: a ``torch.nn.SyncBatchNorm`` drop-in over arraysyncbn's functional API.

:class:`SyncBatchNorm` is a :class:`torch.nn.modules.batchnorm._BatchNorm` (code
that finds batch-norm layers by type keeps working) with the same parameters,
buffers and state dict as ``torch.nn.BatchNorm2d``. Its forward and backward
are one :class:`torch.autograd.Function` over
:func:`~arraysyncbn.sync_batch_norm_forward` and
:func:`~arraysyncbn.sync_batch_norm_backward`: torch CPU tensors (float16,
bfloat16, float32, float64) run the fused host kernels on zero-copy views,
everything else (CUDA tensors) the portable array-API route on the tensors
themselves. Ranks are any arraysyncbn communicator: ``None`` (a world of
one), :func:`~arraysyncbn.thread_group`, :class:`~arraysyncbn.MPICommunicator`
or :class:`~arraysyncbn.TorchDistributedCommunicator` (``torch.distributed``,
what torch's ``process_group`` argument means here). Thread ranks train on CPU
tensors only: autograd runs every thread's CUDA backward on one engine thread,
where the ranks' backward allreduce would deadlock, so the layer raises.

:func:`convert_sync_batchnorm` swaps every batch-norm layer of a model
(``BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm``, lazy ones that have
seen an input: any ``_BatchNorm``) for this layer, sharing parameters and
buffers; :func:`revert_sync_batchnorm` turns them back into plain torch batch
norm (:class:`BatchNormXd`, which like this layer takes input of any rank ≥ 2).

Semantics, as in ``torch.nn.SyncBatchNorm``: training mode normalizes with
the statistics of the global batch and updates the running statistics in
place (where ``track_running_stats``); eval mode uses the running
statistics, or, where they are None (built with
``track_running_stats=False``), the *local* batch's statistics (eval never
communicates, so evaluating on one rank cannot hang the others). Weight and
bias gradients are this rank's (not reduced): data-parallel training
(``DistributedDataParallel``) averages them. Differences: ``comm=None`` is a
world of one, not torch's default process group (pass
``comm=TorchDistributedCommunicator()`` for that); CPU tensors are welcome;
a global batch of zero elements leaves the running statistics and
``num_batches_tracked`` unchanged; double backward raises; ``torch.jit``
(trace, script) refuses it with a clear error (``torch.compile`` works, with
a graph break around the layer in training mode and none in eval mode
with dtypes torch's batch norm takes, where the layer is plain batch
norm, which also exports with ``torch.export``, strict or not; ``torch.fx`` traces it as a leaf, as
torch's batch norm); under ``torch.func`` transforms (vmap, grad) eval mode runs as
plain torch batch norm and training mode raises; a
layer with a communicator cannot be pickled (``torch.save(model)``: save
the state dict, or set ``comm=None`` first); meta tensors give shapes, as
plain batch norm does.

This module imports torch; ``import arraysyncbn`` does not import it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import operator
import weakref
from typing import Any

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from . import _fast
from . import functional as F
from .comm.base import Communicator, SelfCommunicator, as_communicator
from .comm.calls import CallLabel, next_layer
from .comm.threads import ThreadCommunicator
from .layer import checked_num_features

__all__ = ["BatchNormXd", "SyncBatchNorm", "convert_sync_batchnorm", "revert_sync_batchnorm"]

_DOUBLE_BACKWARD = (
    "arraysyncbn.torch.SyncBatchNorm does not support double backward (its backward runs "
    "outside autograd); use torch.nn.BatchNorm2d (arraysyncbn.torch.revert_sync_batchnorm) "
    "where second derivatives are needed"
)


class _Call:
    """One forward's inputs that are not tensors to differentiate, and what it
    hands back to the module (the new running statistics and the saved step)."""

    __slots__ = (
        "center",
        "check",
        "comm",
        "eps",
        "label",
        "momentum",
        "new_mean",
        "new_var",
        "num_batches_tracked",
        "running_mean",
        "running_var",
        "saved",
        "training",
        "views",
    )

    def __init__(
        self,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        training: bool,
        momentum: float | None,
        eps: float,
        comm: Communicator | None,
        num_batches_tracked: int,
        check: bool,
        center: torch.Tensor | None,
        label: CallLabel | None,
    ) -> None:
        self.running_mean, self.running_var = running_mean, running_var
        self.training, self.momentum, self.eps = training, momentum, eps
        self.comm, self.num_batches_tracked, self.check = comm, num_batches_tracked, check
        self.center, self.label = center, label
        self.new_mean = self.new_var = self.saved = None
        # numpy views of (x, weight, bias, running_mean, running_var) where
        # the call runs on them (see _host_views), else None.
        self.views: tuple[Any, ...] | None = None


class _SyncState:
    """What a layer derives from its past synchronized calls (see
    ``SyncBatchNorm._forget``). A plain object, not module attributes:
    ``torch.nn.Module.__setattr__`` costs microseconds, and these change
    on every call."""

    __slots__ = ("buffers", "calls", "center", "checked", "device", "layer")

    def __init__(self) -> None:
        # The merge center: the last reduced mean, the same bits on every
        # rank of the communicator it came from, and the device of the input
        # it came from (the center itself lives where statistics are merged,
        # the host for a device without float64).
        self.center: torch.Tensor | None = None
        self.device: torch.device | None = None
        self.checked = False  # whether the consistency check ran there
        # Layer number on the communicator, given at the first communicating
        # call (not at construction: a copy built on one rank only must not
        # shift the numbers), and the count of its calls: the signature that
        # every collective of this layer carries.
        self.layer: int | None = None
        self.calls = 0
        # The running statistics and count last found writable through numpy
        # views (see _numpy_writable), kept to compare by identity.
        self.buffers: tuple[torch.Tensor | None, ...] = ()

    def for_copy(self) -> _SyncState:
        """The state a copy of the layer starts from: a new layer to the
        communicator (numbered at its own first communicating call, checked
        then), so that ranks calling the copy where others call the original
        fail alike instead of mixing the two; the merge center (the same
        bits on every rank) is kept."""
        new = _SyncState()
        new.center, new.device = self.center, self.device
        return new


def _forward(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, call: _Call
) -> torch.Tensor:
    """The functional forward of ``call`` on the tensors, or on their numpy
    views (``call.views``: the kernels then take at most torch's threads, as
    on the tensors); its other results go into ``call``."""
    views = call.views
    if views is None:
        args = (x, weight, bias, call.running_mean, call.running_var)
    else:
        args = views
    token = _fast.THREADS_AS.set(None if views is None else "torch")
    try:
        y, call.new_mean, call.new_var, call.saved = F.sync_batch_norm_forward(
            *args,
            training=call.training,
            momentum=call.momentum,
            eps=call.eps,
            axis=1,
            comm=call.comm,
            num_batches_tracked=call.num_batches_tracked,
            check=call.check,
            center=call.center,
            label=call.label,
        )
    finally:
        _fast.THREADS_AS.reset(token)
    if views is None:
        return y if y.is_contiguous() else _torch_layout(x, y)  # type: ignore[no-any-return]
    return _wrapped(x, y)


def _wrapped(x: torch.Tensor, y: np.ndarray) -> torch.Tensor:
    """The numpy route's y as a tensor, in the memory layout torch's batch norm gives."""
    t = torch.from_numpy(y)
    return t if y.flags.c_contiguous else _torch_layout(x, t)


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
try:  # torch's own rule for an output's layout (private; the fallback is close)
    from torch._prims_common import suggest_memory_format as _suggest_memory_format
except ImportError:  # pragma: no cover - other torch versions
    _suggest_memory_format = None


def _torch_layout(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` (not contiguous) in the memory layout torch's batch norm gives
    for ``x`` (``empty_like(x, x.suggest_memory_format())``: channels-last
    for 4-D and 5-D input strided so, contiguous otherwise). The kernels
    write y in x's layout, which for other inputs (a transposed (N, L, C)
    sequence seen as (N, C, L), a transposed 2-D batch) made
    ``y.view(...)`` fail where torch's output allows it."""
    if _suggest_memory_format is not None:
        target = _suggest_memory_format(x)
    else:
        fmt = _CHANNELS_LAST.get(x.dim())
        keep = fmt is not None and x.is_contiguous(memory_format=fmt)
        target = fmt if keep else torch.contiguous_format
    return y if y.is_contiguous(memory_format=target) else y.contiguous(memory_format=target)


def _forward_ad_active() -> bool:
    """Whether a forward-mode AD level is open (dual tensors need not require
    grad): the autograd Function then runs, and says it has no jvp, rather
    than the tangent being dropped."""
    level = getattr(getattr(torch.autograd, "forward_ad", None), "_current_level", -1)
    return bool(level >= 0)


_HOST_DTYPES = (torch.float32, torch.float64)
# numpy's dtypes of the views of float32 and float64 tensors (asked for every
# tensor of every call, in one set operation).
_NUMPY_FLOATS = frozenset((np.dtype(np.float32), np.dtype(np.float64)))
_DETACH, _NUMPY = torch.Tensor.detach, torch.Tensor.numpy
_DTYPE = operator.attrgetter("dtype")
_NONE_TYPE = type(None)
# torch ≥ 2.1; without it the numpy route's buffer writes go through torch ops.
_increment_version = getattr(getattr(torch.autograd, "graph", None), "increment_version", None)


def _host_views(
    x: torch.Tensor, tensors: tuple[torch.Tensor | None, ...], comm: Communicator | None
) -> tuple[Any, ...] | None:
    """numpy views of ``x`` and ``tensors`` (None kept) where all are plain CPU
    float32/float64 tensors, else None.

    The layer then calls the functional API on numpy arrays: the same
    kernels and results as on the tensors (whose host route converts them to
    these very views), without converting each argument and result between
    torch and numpy inside every call; that cost tens of microseconds a step
    once the kernels have streamed the input through the caches. Half
    precision keeps the tensor route, which rounds as torch does, and so
    does a communicator of another kind than this package's (``comm``;
    None: no communication), which is promised buffers of the caller's
    library. The kernels use at most torch's thread count, as on tensors.
    Where the host route is off (``ARRAYSYNCBN_FAST=0``, no numba) the
    portable route runs on the tensors, with torch's operations.

    Past x's dtype, ``Tensor.numpy()`` itself refuses what the host route
    must not view (a tensor off the CPU, with the neg bit, sparse, a
    subclass such as torch.export's fake tensors, a bfloat16 parameter); a
    float16 or complex view is refused by its dtype. Asking it, rather than
    each of the tensor's properties first, keeps the step to few kinds of
    torch call: after the kernels have streamed x, each kind costs
    microseconds the first time.
    """
    if comm is not None and type(comm) not in _numpy_comms():
        return None
    if _fast.host_route_off():
        return None  # the portable route, on the tensors themselves
    if x.dtype not in _HOST_DTYPES:
        # Half precision keeps the tensor route; asked first because numpy()
        # of a bfloat16 tensor raises, and a C++ exception costs ~60 µs.
        return None
    present = (x, *tensors)
    # affine=False, or no running statistics. By type: `None in tensors`
    # compares each tensor with None through torch, ~45 µs.
    if _NONE_TYPE in map(type, tensors):
        present = tuple(t for t in present if t is not None)
    try:  # C-level loops: asked on every call
        arrays = tuple(map(_NUMPY, map(_DETACH, present)))
    except (RuntimeError, TypeError):
        return None
    if not set(map(_DTYPE, arrays)) <= _NUMPY_FLOATS:
        return None
    if len(arrays) == len(tensors) + 1:
        return arrays
    found = iter(arrays)
    return (next(found), *(None if t is None else next(found) for t in tensors))


def _numpy_writable(state: _SyncState, mean: Any, var: Any, tracked: torch.Tensor | None) -> bool:
    """Whether the running statistics (``mean``, ``var``: tensors with numpy
    views) and ``tracked`` may be written through numpy views: plain CPU
    tensors that are not inference tensors. Outside inference mode, torch
    refuses in-place writes to inference tensors (a layer built under
    ``torch.inference_mode()``, then trained): so does this, with torch's
    error, before writing any. Known buffers are recognized by identity."""
    known = state.buffers
    if known and known[0] is mean and known[1] is var and known[2] is tracked:
        return True
    # Any may be None, as torch allows (track_running_stats with the buffers
    # set to None: batch statistics, nothing stored).
    tensors = tuple(t for t in (mean, var, tracked) if t is not None)
    if tracked is not None and (
        tracked.layout != torch.strided or not tracked.is_cpu or tracked.requires_grad
    ):
        return False  # torch's own add_ then counts it, or says why not
    if any(t.is_inference() for t in tensors):
        if not torch.is_inference_mode_enabled():
            raise RuntimeError(
                "Inplace update to inference tensor outside InferenceMode is not allowed: "
                "the layer's running statistics were made under torch.inference_mode(); "
                "clone them (or build the layer outside it) to train"
            )
        return True
    state.buffers = (mean, var, tracked)
    return True


@functools.cache
def _numpy_comms() -> frozenset[type]:
    """This package's communicators: they take numpy buffers from any rank's route."""
    from .comm.mpi import MPICommunicator
    from .comm.torch_dist import TorchDistributedCommunicator

    return frozenset(
        {SelfCommunicator, ThreadCommunicator, MPICommunicator, TorchDistributedCommunicator}
    )


def _tensor(a: Any) -> torch.Tensor | None:
    """``a`` as a tensor: a numpy result of the layer's numpy route wrapped (no copy)."""
    return torch.from_numpy(a) if isinstance(a, np.ndarray) else a


def _array(t: torch.Tensor | None) -> Any:
    """A CPU tensor as the numpy route takes it (a view); numpy arrays and None as they are."""
    return t.detach().numpy() if isinstance(t, torch.Tensor) else t


class _SyncBatchNormFunction(torch.autograd.Function):
    """y = SyncBN(x; weight, bias) with the backward of the functional API."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        call: _Call,
    ) -> torch.Tensor:
        y = _forward(x, weight, bias, call)
        # x is kept by autograd alone, as torch's own layers keep it: freed
        # after the backward (unless retain_graph), version-checked against
        # in-place changes. The record on ctx, which lives as long as the
        # graph, keeps per-channel values only.
        ctx.save_for_backward(x)
        saved = call.saved
        saved.release_input()  # type: ignore[union-attr]
        ctx.saved = saved
        ctx.numpy = call.views is not None
        return y

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, dy: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        if dy is None:  # only with set_materialize_grads(False); kept for safety
            dy = torch.zeros_like(x)
        create_graph = torch.is_grad_enabled()
        if not ctx.numpy:
            dy = dy.detach()
        else:  # the forward ran on numpy views: so does the backward
            try:  # autograd's dy, as a rule: needs no grad, no neg bit to resolve
                dy = dy.numpy()  # y's dtype: float32 or float64
            except RuntimeError:
                dy = dy.detach().resolve_neg().numpy()
        saved = ctx.saved
        saved.restore_input(x.detach().numpy() if ctx.numpy else x)
        token = _fast.THREADS_AS.set("torch" if ctx.numpy else None)
        # autograd runs a backward with grad mode off, unless create_graph.
        mode = torch.no_grad() if create_graph else contextlib.nullcontext()
        try:
            with mode:
                # Every rank runs the whole backward, dx included, even where x
                # needs no gradient: the backward's allreduce must happen on every
                # rank alike, and needs_input_grad need not agree across ranks.
                dx, dweight, dbias = F.sync_batch_norm_backward(dy, saved)
        finally:
            _fast.THREADS_AS.reset(token)
            saved.release_input()
        need = ctx.needs_input_grad
        if ctx.numpy:  # numpy results (None where there is no weight or bias)
            from_numpy = torch.from_numpy
            dx = from_numpy(dx) if need[0] else None
            dweight = from_numpy(dweight) if need[1] else None
            dbias = from_numpy(dbias) if need[2] else None
            grads = [dx, dweight, dbias]
        else:
            grads = [g if n else None for g, n in zip((dx, dweight, dbias), need, strict=False)]
        if create_graph:
            grads = _refuse_double_backward(grads)
        return (*grads, None)


class _DoubleBackwardError(torch.autograd.Function):
    """Identity whose backward raises: marks gradients that cannot be differentiated."""

    @staticmethod
    def forward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def backward(ctx: Any, *unused: Any) -> Any:  # type: ignore[override]
        raise RuntimeError(_DOUBLE_BACKWARD)


def _refuse_double_backward(grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """``grads`` as tensors whose differentiation raises a clear error (create_graph)."""
    present = [i for i, g in enumerate(grads) if g is not None]
    if not present:
        return grads
    # Fresh leaves that require grad, so the error node is part of the graph.
    leaves = [grads[i].detach().requires_grad_(True) for i in present]  # type: ignore[union-attr]
    wrapped = _DoubleBackwardError.apply(*leaves)
    out = list(grads)
    for i, g in zip(present, wrapped, strict=True):
        out[i] = g
    return out


_GRAPH_BREAK = (
    "arraysyncbn.torch.SyncBatchNorm runs compiled kernels and collectives that "
    "torch.compile does not trace: in training mode the layer is a graph break "
    "(fullgraph=True cannot hold it; eval mode can; revert_sync_batchnorm(model) gives "
    "plain torch batch norm for one process)"
)


def _graph_break(fn: Any) -> Any:
    """``fn`` opaque to torch.compile, saying why where torch takes a reason
    (``fullgraph=True`` then names this layer, not a bare "reason: None")."""
    try:
        return torch.compiler.disable(fn, reason=_GRAPH_BREAK)
    except TypeError:  # a torch without disable(reason=)
        return torch.compiler.disable(fn)


# Whether a torch.func transform (vmap, grad, jacrev, ...) is running; a C
# call of ~30 ns. Torch versions without it cannot run the check: assume none.
_func_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)

_NO_FUNC_TRAINING = (
    "arraysyncbn.torch.SyncBatchNorm cannot run in training mode under torch.func "
    "transforms (vmap, grad, jacrev, ...): its training step runs compiled kernels and "
    "collectives outside torch's operators. Eval mode works (plain torch batch norm); "
    "for training under torch.func in one process use revert_sync_batchnorm(model)"
)


def _fx_leaf(module: _BatchNorm, x: Any) -> Any:
    """``module(x)`` as one ``call_module`` node of a ``torch.fx`` trace, the way
    torch.fx records torch's own batch-norm layers (leaves): tracing into the
    step would meet its data-dependent branches and collectives."""
    tracer = x.tracer
    path = tracer.path_of_module(module)
    if not path:  # the trace's root: no parent module to record the call in
        raise RuntimeError(
            "torch.fx records arraysyncbn.torch.SyncBatchNorm as one call of the model "
            "that holds it: trace that model, not the layer alone"
        )
    return tracer.create_proxy("call_module", path, (x,), {})


_TENSOR_NAMES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# Layer classes that define none of _TENSOR_NAMES: their tensors are read
# from nn.Module's dicts (see SyncBatchNorm._tensors).
_DICT_CLASSES: weakref.WeakSet[type] = weakref.WeakSet()


class SyncBatchNorm(_BatchNorm):
    """Batch normalization over the global batch of every rank of ``comm``.

    A drop-in for :class:`torch.nn.SyncBatchNorm` that runs on CPU and CUDA
    tensors and over any arraysyncbn communicator.

    Parameters
    ----------
    num_features : int
        Number of channels C (dim 1 of the input).
    eps : float
        Added to the variance (> 0).
    momentum : float in [0, 1] or None
        Running-statistics factor; None is the cumulative average.
    affine : bool
        Learnable per-channel ``weight`` (ones) and ``bias`` (zeros).
    track_running_stats : bool
        Keep ``running_mean``, ``running_var`` and ``num_batches_tracked``.
    process_group : torch.distributed.ProcessGroup or None
        As in torch: synchronize over this process group; the same as
        ``comm=TorchDistributedCommunicator(process_group)``. Not together
        with ``comm``.
    device, dtype :
        Where and in which dtype to create parameters and buffers (torch's
        factory arguments).
    comm : Communicator or None
        The ranks to synchronize over: None (a world of one; unlike torch's
        ``process_group=None``, not the default group: a training forward
        warns when ``torch.distributed`` runs several processes),
        :func:`~arraysyncbn.thread_group` ranks,
        :class:`~arraysyncbn.MPICommunicator`,
        :class:`~arraysyncbn.TorchDistributedCommunicator` (a
        ``torch.distributed`` group given here is wrapped in one). Assigning
        ``module.comm`` later is allowed (on every rank alike).
    bias : bool
        With ``affine``, whether to learn a bias too (torch's keyword; False
        needs a torch that has it).

    Shape and dtype
    ---------------
    Input ``(N, C, *)`` of any rank ≥ 2, contiguous or ``channels_last``,
    float16/bfloat16/float32/float64, on any device; the output has the
    input's shape, dtype and device, and the memory layout torch's batch
    norm gives (``channels_last`` for 4-D and 5-D input laid out so,
    contiguous otherwise, also for a transposed input). float16/bfloat16 input
    wants float32 parameters (the default) and is computed in float32.
    Ranks may hold different N (also 0); they must agree on everything else.

    Notes
    -----
    The running statistics are updated in place from the global batch, with
    Bessel's correction by the global element count; every rank gets the
    same bits. The first training forward checks that all ranks agree on C,
    dtype, eps, momentum, affine, track_running_stats, the parameters' and
    buffers' dtypes and, with ``momentum=None``, ``num_batches_tracked``
    (:class:`~arraysyncbn.CollectiveMismatchError` on every rank if not).
    Statistics are merged around the last reduced batch mean (kept per
    module, forgotten on ``load_state_dict`` and when ``comm`` changes), so
    data far from zero keeps its precision.

    Examples
    --------
    >>> import torch
    >>> from arraysyncbn.torch import SyncBatchNorm
    >>> bn = SyncBatchNorm(3)
    >>> x = torch.arange(24.0).reshape(4, 3, 2)
    >>> y = bn(x.requires_grad_())
    >>> y.sum().backward()
    >>> bn.bias.grad
    tensor([8., 8., 8.])
    >>> bn.running_mean
    tensor([0.9500, 1.1500, 1.3500])
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
        *,
        comm: Communicator | None = None,
        bias: bool = True,
    ) -> None:
        channels = checked_num_features(num_features, eps, momentum)
        comm = _communicator(comm, process_group)
        # torch ≥ 2.12 knows bias=False (a weight without a bias); older torch does not.
        extra = {} if bias else {"bias": False}
        super().__init__(
            channels, eps, momentum, affine, track_running_stats, device, dtype, **extra
        )
        self.comm = comm
        # Read once: whether to communicate for a check must not change
        # mid-run on one rank (the first check verifies all ranks agree).
        self._check_every_call = F.check_every_call()

    # The class revert_sync_batchnorm gives back: the torch batch norm that
    # convert_sync_batchnorm replaced (BatchNorm1d/2d/3d), None for BatchNormXd.
    _reverts_to: type[_BatchNorm] | None = None

    @classmethod
    def convert_sync_batchnorm(
        cls, module: torch.nn.Module, process_group: Any = None
    ) -> torch.nn.Module:
        """torch's spelling, ``SyncBatchNorm.convert_sync_batchnorm(module,
        process_group=None)``: :func:`convert_sync_batchnorm` with
        ``process_group`` (a ``torch.distributed`` group, or any arraysyncbn
        communicator)."""
        return convert_sync_batchnorm(module, process_group)

    # -- communicator and the state derived from it --------------------------------
    @property
    def comm(self) -> Communicator:
        """The ranks this layer synchronizes over (assign None for a world of one)."""
        return self._comm

    @comm.setter
    def comm(self, value: Communicator | None) -> None:
        comm = as_communicator(_communicator(value, None))
        if comm is getattr(self, "_comm", None):
            return  # the same ranks: keep the center, the check and the numbering
        self._comm = comm
        self._forget()

    @property
    def process_group(self) -> Any:
        """torch.nn.SyncBatchNorm's attribute: the ``torch.distributed`` group this
        layer synchronizes over when its communicator is a
        :class:`~arraysyncbn.TorchDistributedCommunicator` (None there means
        torch's default group), else None. Assigning sets :attr:`comm` as the
        constructor's ``process_group=`` does (a group is wrapped; None is a
        world of one, as ``comm=None``)."""
        from .comm.torch_dist import TorchDistributedCommunicator

        comm = self._comm
        return comm.group if isinstance(comm, TorchDistributedCommunicator) else None

    @process_group.setter
    def process_group(self, group: Any) -> None:
        self.comm = group

    def _forget(self) -> None:
        """Drop what was derived from past statistics or another communicator."""
        self._sync = _SyncState()

    @property
    def _center(self) -> torch.Tensor | None:
        return _tensor(self._sync.center)

    @property
    def _checked(self) -> bool:
        return self._sync.checked

    def __deepcopy__(self, memo: dict[int, Any]) -> SyncBatchNorm:
        """A copy that shares the communicator (a handle on a group of ranks, which
        often cannot be copied: locks, MPI or torch.distributed groups), so that
        ``copy.deepcopy(model)`` (EMA copies, evaluation copies) works. The copy
        is a new layer to the communicator, numbered at its own first
        communicating call: an eval copy on one rank only upsets nothing, and
        ranks that train the copy where others train the original raise
        :class:`~arraysyncbn.CollectiveMismatchError` alike."""
        memo[id(self._comm)] = self._comm
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        new._sync = self._sync.for_copy()
        return new

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._sync.center = None

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"expected input of at least 2 dimensions (N, C, *), got shape {tuple(input.shape)}"
            )
        if input.layout != torch.strided:  # else an error from deep inside the kernels
            raise TypeError(f"expected a dense (strided) tensor, got layout {input.layout}")
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"expected {self.num_features} channels on dim 1 (num_features), got input "
                f"of shape {tuple(input.shape)}"
            )

    # -- the pass ---------------------------------------------------------------------
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalize ``input`` ``(N, C, *)``; return a tensor like it."""
        if isinstance(input, torch.fx.Proxy):
            return _fx_leaf(self, input)
        self._check_input_dim(input)
        if self.training and _is_exporting():
            raise RuntimeError(_NO_EXPORT_TRAINING)
        if torch.compiler.is_compiling():
            if not self.training and _torch_takes_dtypes(self, input):
                # Eval never communicates: it is plain batch norm, which
                # torch.compile (fullgraph too) and strict torch.export trace.
                return _local_batch_norm(self, input)
            return self._opaque_step(input)
        if torch.jit.is_tracing():  # scripting stops at __prepare_scriptable__
            raise RuntimeError(_NO_JIT)
        if input.is_meta:  # shapes only (no data, nothing to synchronize)
            return _local_batch_norm(self, input)
        if _func_transforms_active():
            return self._under_func_transform(input)
        return self._step(input)

    def _under_func_transform(self, x: torch.Tensor) -> torch.Tensor:
        """The layer under ``torch.func`` transforms (vmap, grad, ...), which see
        only torch operators: eval mode never communicates, so it is plain torch
        batch norm; a training step's collectives cannot be batched or
        transformed."""
        if self.training:
            raise RuntimeError(_NO_FUNC_TRAINING)
        return _local_batch_norm(self, x)

    def __copy__(self) -> SyncBatchNorm:
        """A shallow copy, as ``copy.copy`` of any module makes (parameters and
        the communicator shared), with its own per-call state: a new layer to
        the communicator, as for ``copy.deepcopy``."""
        new = self.__class__.__new__(self.__class__)
        new.__dict__.update(self.__dict__)
        new._sync = self._sync.for_copy()
        return new

    def __prepare_scriptable__(self) -> SyncBatchNorm:
        raise RuntimeError(_NO_JIT)

    def __getstate__(self) -> dict[str, Any]:
        if not isinstance(self._comm, SelfCommunicator):
            raise TypeError(
                f"a SyncBatchNorm synchronized over {self._comm!r} cannot be pickled (its "
                "communicator is a handle on other processes or threads): save "
                "model.state_dict() instead, or set comm=None first"
            )
        return super().__getstate__()  # type: ignore[no-any-return]

    def _step(self, x: torch.Tensor) -> torch.Tensor:
        training, tracking = self.training, self.track_running_stats
        tensors = self._tensors()
        if not training:
            y = self._inference(x, tensors)
            if y is not None:
                return y
        # Like torch.nn.SyncBatchNorm, only training mode communicates (and
        # uses batch statistics then, whatever track_running_stats says).
        state = self._sync
        center = label = None
        check = False
        if training:
            if isinstance(self._comm, ThreadCommunicator):
                self._check_thread_ranks(x)
            # A module moved to another device: the next reduced mean replaces it.
            center = state.center if state.device == x.device else None
            check = not state.checked or self._check_every_call
            if state.layer is None:
                if isinstance(self._comm, SelfCommunicator):
                    _warn_if_distributed()
                state.layer = next_layer(self._comm)
            state.calls += 1
            label = CallLabel._trusted("forward", state.calls, state.layer)
        momentum = self.momentum
        weight, bias, running_mean, running_var, tracked = tensors
        count = 0
        if training and tracking and momentum is None:
            if tracked is None:  # as torch: no count, no cumulative average
                momentum = 0.0
            else:
                count = int(tracked)
        # As torch's batch norm: eval normalizes with the running statistics
        # wherever they exist (track_running_stats only says whether training
        # updates them), with the batch's where they are None.
        stats = tracking or not training
        call = _Call(
            running_mean if stats else None,
            running_var if stats else None,
            training,
            momentum,
            self.eps,
            self._comm if training else None,
            count,
            check,
            center,
            label,
        )
        call.views = _host_views(x, (weight, bias, call.running_mean, call.running_var), call.comm)
        call.center = _array(center) if call.views is not None else _tensor(center)
        if _forward_ad_active() or (
            torch.is_grad_enabled()
            and (
                x.requires_grad
                or (weight is not None and weight.requires_grad)
                or (bias is not None and bias.requires_grad)
            )
        ):
            y = _SyncBatchNormFunction.apply(x, weight, bias, call)
        else:
            # Nothing to differentiate (no_grad, inference_mode, frozen layers):
            # no autograd node, whose bookkeeping costs ~25 µs a call.
            y = _forward(x, weight, bias, call)
        saved = call.saved
        if check:
            state.checked = True
        if training and saved.count:  # type: ignore[union-attr]
            if tracking:
                self._store_statistics(call, tracked)
            # Not saved.mean: a channel whose batch was not finite keeps its
            # last finite center, or one NaN batch would poison every merge.
            state.center, state.device = saved.center, x.device  # type: ignore[union-attr]
        return y

    def _inference(
        self, x: torch.Tensor, tensors: tuple[torch.Tensor | None, ...]
    ) -> torch.Tensor | None:
        """Eval mode with nothing to differentiate (no_grad, inference_mode,
        frozen layers) and running statistics:
        :func:`arraysyncbn.functional.batch_norm_inference`, the values of the
        full step with a fraction of its per-call work (inference at small
        batches): on numpy views of plain CPU float32/float64 tensors, on the
        tensors otherwise (half precision takes its lean host path there too).
        None where something needs a gradient: the full step runs.
        ``tensors``: :meth:`_tensors`."""
        weight, bias, running_mean, running_var, _ = tensors
        if running_mean is None or running_var is None:
            return None  # batch statistics, as torch's eval without them
        if (
            torch.is_grad_enabled()
            and (
                x.requires_grad
                or (weight is not None and weight.requires_grad)
                or (bias is not None and bias.requires_grad)
            )
        ) or _forward_ad_active():
            return None
        views = _host_views(x, (weight, bias, running_mean, running_var), None)
        token = _fast.THREADS_AS.set("torch")
        try:
            if views is not None:
                return _wrapped(x, F.batch_norm_inference(*views, eps=self.eps, axis=1))
            y = F.batch_norm_inference(
                x, weight, bias, running_mean, running_var, eps=self.eps, axis=1
            )
        finally:
            _fast.THREADS_AS.reset(token)
        return y if y.is_contiguous() else _torch_layout(x, y)

    def _tensors(self) -> tuple[torch.Tensor | None, ...]:
        """weight, bias, running_mean, running_var, num_batches_tracked.

        Read from the dicts behind nn.Module's attribute lookup, whose
        __getattr__ costs microseconds a name once a kernel has run; through
        that lookup where a name has moved (torch.nn.utils.parametrize turns
        a parameter or buffer into a property).
        """
        cls = type(self)
        # This class defines none of them (a WeakSet lookup costs ~1 µs a call).
        if cls is not SyncBatchNorm and cls not in _DICT_CLASSES:
            if any(hasattr(cls, name) for name in _TENSOR_NAMES):
                # A class that defines one of them (a property): its own lookup.
                return tuple(getattr(self, name) for name in _TENSOR_NAMES)
            _DICT_CLASSES.add(cls)
        parameters, buffers = self._parameters, self._buffers
        try:
            return (
                parameters["weight"],
                parameters["bias"],
                buffers["running_mean"],
                buffers["running_var"],
                buffers["num_batches_tracked"],
            )
        except KeyError:
            return tuple(getattr(self, name) for name in _TENSOR_NAMES)

    def _store_statistics(self, call: _Call, tracked: torch.Tensor | None) -> None:
        """Write the step's running statistics into the buffers and count it in
        ``tracked`` (num_batches_tracked; None, as torch allows: not counted)."""
        buffers = (call.running_mean, call.running_var)
        news = (call.new_mean, call.new_var)
        if (
            call.views is not None
            and _increment_version is not None
            and _numpy_writable(self._sync, *buffers, tracked)
        ):
            # numpy writes, then the version bump torch's in-place ops make
            # (autograd then still catches a saved buffer changed in place).
            for buf, view, new in zip(buffers, call.views[3:], news, strict=True):
                if new is not view:
                    np.copyto(view, new)
                    _increment_version(buf)
            if tracked is not None:
                # Through its numpy view too: torch's add_ is one more kind of
                # call, ~30 µs the first time after the kernels have run.
                count = tracked.numpy()
                count[()] += 1
                _increment_version(tracked)
            return
        with torch.no_grad():
            for buf, new in zip(buffers, news, strict=True):
                if new is not buf:
                    buf.copy_(_tensor(new))  # type: ignore[union-attr]
            if tracked is not None:
                tracked.add_(1)

    def _check_thread_ranks(self, x: torch.Tensor) -> None:
        """Refuse a training step that autograd would deadlock: torch's engine runs
        the backward of every thread's device (non-CPU) tensors on one worker
        thread per device, so the first rank's backward would wait in the
        allreduce for ranks queued behind it. CPU backward runs on each calling
        thread and is fine. Every thread rank shares one device (the group checks
        it); grad mode is per thread, so a rank under no_grad alone would go on
        to the allreduce while the others raise: run_ranks aborts it then (or
        the watchdog ends its wait), it cannot hang."""
        if (
            self._comm.size > 1
            and x.device.type != "cpu"
            and torch.is_grad_enabled()
            and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        ):
            raise RuntimeError(_NO_DEVICE_THREAD_RANKS.format(device=x.device))

    # Opaque to torch.compile (a graph break): the step runs numba kernels and
    # collectives that Dynamo cannot trace. Only while compiling: in eager
    # mode the wrapper's cost would be paid on every call.
    _opaque_step = _graph_break(_step)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, comm={self._comm!r}"


_NO_DEVICE_THREAD_RANKS = (
    "thread ranks cannot train arraysyncbn.torch.SyncBatchNorm on {device} tensors with "
    "autograd: torch runs the backward of every thread's {device} tensors on one worker "
    "thread, so the first rank's backward would wait for the others forever. Use one "
    "process per device (torchrun with TorchDistributedCommunicator, or mpiexec with "
    "MPICommunicator), CPU tensors, or arraysyncbn.sync_batch_norm_forward/backward "
    "called directly in the threads"
)


_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)

_NO_EXPORT_TRAINING = (
    "arraysyncbn.torch.SyncBatchNorm cannot be exported in training mode (torch.export): "
    "its training step runs compiled kernels and collectives outside torch's operators. "
    "Export the model in eval mode (model.eval(): plain batch norm with the running "
    "statistics), or revert_sync_batchnorm(model) first"
)


def _warn_if_distributed() -> None:
    """Warn where a layer over a world of one trains in a torch.distributed job of
    several processes: torch.nn.SyncBatchNorm's ``process_group=None`` means the
    default group there, ours (``comm=None``) this process only."""
    dist = getattr(torch, "distributed", None)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    size = dist.get_world_size()
    if size > 1:
        F.warn_at_caller(
            f"arraysyncbn.torch.SyncBatchNorm with comm=None normalizes over this process "
            f"only, but torch.distributed is initialized with {size} processes. Unlike "
            "torch.nn.SyncBatchNorm, process_group=None is not the default group here: "
            "pass process_group=torch.distributed.group.WORLD, or "
            "comm=arraysyncbn.TorchDistributedCommunicator(), to synchronize",
            UserWarning,
        )


def _communicator(comm: Any, process_group: Any) -> Communicator | None:
    """``comm``, with torch's ``process_group`` (or a ``torch.distributed``
    group given as ``comm``) wrapped in a TorchDistributedCommunicator."""
    if process_group is not None:
        if comm is not None:
            raise TypeError("give process_group or comm, not both")
        comm = process_group
    dist = getattr(torch, "distributed", None)
    if (
        comm is not None
        and dist is not None
        and dist.is_available()
        and isinstance(comm, dist.ProcessGroup)
    ):
        # One wrapper per group, whichever spelling and layer asks: layers are
        # numbered per communicator object in the calls' signatures.
        wrapper = _GROUP_WRAPPERS.get(comm)
        if wrapper is None:
            from .comm.torch_dist import TorchDistributedCommunicator

            wrapper = _GROUP_WRAPPERS[comm] = TorchDistributedCommunicator(comm)
        return wrapper  # type: ignore[no-any-return]
    return comm  # type: ignore[no-any-return]


_GROUP_WRAPPERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
"""The TorchDistributedCommunicator of each torch.distributed group given as a group."""


_NO_JIT = (
    "arraysyncbn.torch.SyncBatchNorm cannot be traced or scripted by torch.jit (its step "
    "runs compiled kernels and collectives outside TorchScript); use torch.compile, or "
    "revert_sync_batchnorm(model) for export"
)


def _torch_takes_dtypes(module: _BatchNorm, x: torch.Tensor) -> bool:
    """Whether torch's batch norm takes x with the module's parameters and
    buffers: the same dtype, or 16-bit x with float32 ones (this layer also
    takes other mixes, which torch refuses)."""
    half = x.dtype in (torch.float16, torch.bfloat16)
    for t in (module.weight, module.bias, module.running_mean, module.running_var):
        if t is not None and t.dtype != x.dtype and not (half and t.dtype == torch.float32):
            return False
    return True


def _local_batch_norm(module: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Plain torch batch norm of ``x`` with ``module``'s parameters and buffers."""
    # torch's _BatchNorm.forward's choices: training uses batch statistics
    # (and updates the running ones if tracked); eval the running statistics
    # where they exist, else the batch's.
    training = module.training
    stats = not training or module.track_running_stats
    mean, var = module.running_mean, module.running_var
    return torch.nn.functional.batch_norm(
        x,
        mean if stats else None,
        var if stats else None,
        module.weight,
        module.bias,
        training or (mean is None and var is None),
        0.0 if module.momentum is None else module.momentum,
        module.eps,
    )


class BatchNormXd(_BatchNorm):
    """Plain torch batch norm (``torch.nn.functional.batch_norm``) for input of any rank ≥ 2.

    What :func:`revert_sync_batchnorm` turns a synchronized layer into: the
    same parameters, buffers and state dict as ``torch.nn.BatchNorm2d``, and
    the same inputs as :class:`SyncBatchNorm` (``(N, C, *)``).
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"expected input of at least 2 dimensions (N, C, *), got shape {tuple(input.shape)}"
            )


def _moved(old: _BatchNorm, new: _BatchNorm) -> _BatchNorm:
    """``new`` with ``old``'s parameters and buffers (the same tensors) and mode."""
    if old.affine:
        new.weight, new.bias = old.weight, old.bias
    if old.track_running_stats:
        new.running_mean, new.running_var = old.running_mean, old.running_var
        new.num_batches_tracked = old.num_batches_tracked
    new.train(old.training)
    if hasattr(old, "qconfig"):
        new.qconfig = old.qconfig
    return new


def _bias_kwarg(module: _BatchNorm) -> dict[str, bool]:
    """``bias=False`` for an affine layer without a bias (torch ≥ 2.12), else nothing."""
    return {"bias": False} if module.affine and module.bias is None else {}


def convert_sync_batchnorm(
    module: torch.nn.Module, comm: Communicator | None = None, *, process_group: Any = None
) -> torch.nn.Module:
    """Replace every batch-norm layer of ``module`` with :class:`SyncBatchNorm`.

    Like :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`: every
    batch-norm layer (a ``torch.nn.modules.batchnorm._BatchNorm``:
    ``torch.nn.BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm``, lazy ones
    that have seen an input, :class:`BatchNormXd`, and this package's own
    :class:`SyncBatchNorm`, which gets the new ``comm``) is replaced by a
    :class:`SyncBatchNorm` over ``comm`` that holds the *same* parameter
    and buffer tensors (an optimizer built earlier keeps working;
    ``requires_grad``, device and dtype are kept) in the same training mode.

    Parameters
    ----------
    module : torch.nn.Module
        A model, or a single batch-norm layer.
    comm : Communicator, torch.distributed.ProcessGroup or None
        What the new layers synchronize over; None is a world of one. A
        ``torch.distributed`` group (torch's positional ``process_group``)
        is wrapped once in :class:`~arraysyncbn.TorchDistributedCommunicator`,
        shared by every new layer.
    process_group : torch.distributed.ProcessGroup or None
        torch's keyword: the same as passing the group as ``comm``. Not
        together with ``comm``.

    Returns
    -------
    torch.nn.Module
        ``module`` with its children replaced, or the new layer if
        ``module`` itself is a batch-norm layer.

    Raises
    ------
    ValueError
        A lazy batch-norm layer (``torch.nn.LazyBatchNorm2d``, ...) that has
        not seen an input yet: its number of features is unknown.
    """
    # One communicator object for every layer, so that layers are numbered in
    # the calls' signatures.
    comm = _communicator(comm, process_group)
    out = module
    if isinstance(module, _BatchNorm):
        if isinstance(module, torch.nn.modules.lazy.LazyModuleMixin) and (
            module.has_uninitialized_params()
        ):
            raise ValueError(
                f"{type(module).__name__} has not seen an input yet, so its number of "
                "features is unknown: run one forward before convert_sync_batchnorm"
            )
        out = _moved(
            module,
            SyncBatchNorm(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                comm=comm,
                **_bias_kwarg(module),
            ),
        )
        kind = type(module)
        reverts_to = kind if kind in _PLAIN else getattr(module, "_reverts_to", None)
        if reverts_to is not None:
            out._reverts_to = reverts_to
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, comm))
    return out


# The batch norms a converted layer reverts to as themselves (not BatchNormXd):
# tools check these exact types (torch.ao.quantization's fusers, for one).
_PLAIN = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


def revert_sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every synchronized batch-norm layer with plain torch batch norm.

    Every :class:`SyncBatchNorm` and ``torch.nn.SyncBatchNorm``; the
    inverse of :func:`convert_sync_batchnorm` for single-process use
    (export, evaluation, quantization, double backward): plain torch batch
    norm, sharing the parameters and buffers, in the same mode. A layer
    that :func:`convert_sync_batchnorm` made from a ``torch.nn.BatchNorm1d``,
    ``2d`` or ``3d`` becomes that class again (tools that look for those
    exact types, such as ``torch.ao.quantization.fuse_modules``, then find
    them); any other (built directly, or from ``torch.nn.SyncBatchNorm``)
    becomes :class:`BatchNormXd`, which accepts every input rank the
    synchronized layer does.

    Returns
    -------
    torch.nn.Module
        ``module`` with its children replaced, or the new layer.
    """
    out = module
    if isinstance(module, (SyncBatchNorm, torch.nn.SyncBatchNorm)):
        kind = getattr(module, "_reverts_to", None) or BatchNormXd
        out = _moved(
            module,
            kind(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                **_bias_kwarg(module),
            ),
        )
    for name, child in module.named_children():
        out.add_module(name, revert_sync_batchnorm(child))
    return out
