"""The :class:`SyncBatchNorm` layer: parameters, buffers, modes and state.

The layer keeps state (weight, bias, running statistics, the last forward's
saved values) and delegates every formula to :mod:`arraysyncbn.functional`.
Parameters and buffers are created lazily, in the namespace and on the device
of the first input, unless ``xp`` (and ``device``) are given up front.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Mapping
from typing import Any

import array_api_compat

from . import functional as F
from . import kernels
from .comm.base import Communicator, SelfCommunicator, as_communicator
from .comm.calls import CallLabel, next_layer
from .errors import NoForwardError

__all__ = ["SyncBatchNorm"]

Array = Any
_PARAM_KEYS = ("weight", "bias")
_BUFFER_KEYS = ("running_mean", "running_var", "num_batches_tracked")


def _resolve_dtype(xp: Any, dtype: Any) -> Any:
    if isinstance(dtype, str):
        try:
            dtype = getattr(xp, dtype)
        except AttributeError:
            raise TypeError(f"{xp.__name__} has no dtype named {dtype!r}") from None
    if not xp.isdtype(dtype, "real floating"):
        raise TypeError(f"parameters need a real floating dtype, got {dtype}")
    return dtype


def _convert(value: Any, xp: Any, device: Any, dtype: Any) -> Array:
    """Return a copy of ``value`` as an array of ``xp`` on ``device`` with ``dtype``.

    Arrays of another library come over by DLPack (or ``asarray``); the cast
    happens before the move, so a float64 source can land on a device that
    has no float64. A floating source narrower than float32 is widened to
    float32 in its own library first: exact, and every library reads
    float32, while torch's bfloat16 has no numpy equivalent and
    array-api-strict has no float16.
    """
    if not array_api_compat.is_array_api_obj(value):
        return xp.asarray(value, dtype=dtype, device=device, copy=True)
    src = array_api_compat.array_namespace(value)
    if src is not xp:
        if src.isdtype(value.dtype, "real floating") and src.finfo(value.dtype).bits < 32:
            value = src.astype(value, src.float32)
        try:
            value = xp.from_dlpack(value)
        except (AttributeError, TypeError, ValueError, RuntimeError, BufferError):
            value = xp.asarray(value)
    value = xp.astype(value, dtype, copy=True)
    return array_api_compat.to_device(value, device)


def _shape_of(value: Any) -> tuple[int, ...]:
    shape = getattr(value, "shape", None)
    if shape is None or not array_api_compat.is_array_api_obj(value):
        raise TypeError(f"state dict values must be arrays, got {type(value).__name__}")
    return tuple(int(s) for s in shape)


def _check_entry(key: str, value: Array) -> None:
    """Raise unless ``value`` is a usable value of state dict entry ``key``.

    Run on the value as given and again on the value as it will be stored:
    a float64 1e300 is finite, but not once cast to a float32 buffer.
    """
    xp = array_api_compat.array_namespace(value)
    if not xp.isdtype(value.dtype, ("real floating", "integral")):
        raise TypeError(f"state dict entry {key!r} must have a real dtype, got {value.dtype}")
    if not bool(xp.all(xp.isfinite(value))):
        raise ValueError(f"state dict entry {key!r} has non-finite values (NaN or inf)")
    if key == "running_var" and bool(xp.any(value < 0)):
        raise ValueError("state dict entry 'running_var' has negative values")


def _snapshot(value: Array) -> Array:
    """A copy of ``value`` in its own namespace, so later edits of the caller's
    array do not change what a lazily created layer will load."""
    return array_api_compat.array_namespace(value).asarray(value, copy=True)


def _count_from(value: Any) -> int:
    """``num_batches_tracked`` as an int: an int or a 0-d integer array.

    TypeError for any other type (bool, float, str, None, a floating array),
    ValueError for a negative count or an array that is not 0-d.
    """
    if array_api_compat.is_array_api_obj(value):
        xp = array_api_compat.array_namespace(value)
        if not xp.isdtype(value.dtype, "integral"):
            raise TypeError(f"num_batches_tracked must be an integer, got dtype {value.dtype}")
        if tuple(value.shape) != ():
            raise ValueError(
                f"num_batches_tracked must be a scalar, got shape {tuple(value.shape)}"
            )
        count = int(value)
    else:
        count = F.as_int(value, "num_batches_tracked")
    if count < 0:
        raise ValueError(f"num_batches_tracked must be non-negative, got {count}")
    return count


def _converted(
    checked: Mapping[str, Any], xp: Any, device: Any, like: Mapping[str, Array]
) -> dict[str, Any]:
    """Return checked state dict entries as the layer will store them.

    Arrays become copies in ``xp`` on ``device`` with the dtype of the array
    they replace (``like[key]``), checked again after the cast;
    ``num_batches_tracked`` stays an int. Raises before anything is assigned.
    """
    out: dict[str, Any] = {}
    for key, value in checked.items():
        if key == "num_batches_tracked":
            out[key] = value
        else:
            out[key] = _convert(value, xp, device, like[key].dtype)
            _check_entry(key, out[key])
    return out


def checked_num_features(num_features: Any, eps: Any, momentum: Any) -> int:
    """Return ``num_features`` as an int, once it and ``eps`` and ``momentum`` pass
    the checks of a SyncBN layer's constructor (this one's and the torch module's).

    Raises TypeError for a value of the wrong type, ValueError for a wrong
    value: ``num_features`` first, then ``eps``, then ``momentum``.
    """
    channels = F.as_int(num_features, "num_features")
    if channels <= 0:
        raise ValueError(f"num_features must be a positive int, got {num_features!r}")
    F._check_hyper(eps, momentum)
    return channels


class SyncBatchNorm:
    """Batch normalization over the global batch of every rank of ``comm``.

    Parameters
    ----------
    num_features : int
        Number of channels C.
    eps : float
        Added to the variance (> 0).
    momentum : float in [0, 1] or None
        Running-statistics factor; None is the cumulative average.
    affine : bool
        Keep a learnable per-channel weight (ones) and bias (zeros).
    track_running_stats : bool
        Keep running mean and variance; when False, eval mode also uses
        (synchronized) batch statistics.
    axis : int
        Channel axis of the input (1 for NCHW, -1 for channels-last).
    comm : Communicator or None
        The ranks to synchronize over; None is a world of one.
    dtype, device, xp :
        Where to create parameters and buffers. With ``xp`` given they are
        created now (``dtype`` defaults to float32); otherwise at the first
        forward, in the input's namespace and device, with the input's dtype
        for float32/float64 input (in native byte order) and float32 for
        float16/bfloat16 input (``dtype`` overrides that).

    Notes
    -----
    ``backward`` differentiates the last forward. It needs that forward to
    have used batch statistics: after an eval forward with running
    statistics it raises :class:`~arraysyncbn.NoForwardError` rather than
    silently differentiating an older training forward (use
    :func:`~arraysyncbn.sync_batch_norm_backward` for the frozen-statistics
    gradient).

    ``copy.deepcopy`` (an EMA or evaluation copy of a model) shares the
    communicator, a handle on a group of ranks, and copies everything else:
    parameters, running statistics, gradients and the merge center (the
    same bits on every rank, so a copy made on every rank alike merges as
    the original would); ``copy.copy`` shares the arrays too. Either copy is
    a new layer to the communicator, numbered at its own first communicating
    call: ranks that call the copy where others call the original raise
    :class:`~arraysyncbn.CollectiveMismatchError` instead of merging two
    layers' statistics. A copy that never communicates (eval mode with
    running statistics, as an EMA copy is used) may live on some ranks only;
    one trained, or evaluated without running statistics, must be made and
    used on every rank alike, like any layer. A copy has no forward to
    differentiate: ``backward`` needs a forward of its own. Pickling keeps
    what ``copy.deepcopy`` keeps, for a world of one only: pickling a layer
    over other ranks is a TypeError (save ``state_dict()`` instead).

    Examples
    --------
    >>> import array_api_strict as xp
    >>> from arraysyncbn import SyncBatchNorm
    >>> bn = SyncBatchNorm(3)
    >>> x = xp.reshape(xp.arange(24, dtype=xp.float32), (4, 3, 2))
    >>> y = bn(x)
    >>> y.shape, y.dtype == xp.float32
    ((4, 3, 2), True)
    >>> dx = bn.backward(xp.ones_like(y))
    >>> [float(v) for v in bn.grad_bias]
    [8.0, 8.0, 8.0]
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        axis: int = 1,
        comm: Communicator | None = None,
        dtype: Any = None,
        device: Any = None,
        xp: Any = None,
    ) -> None:
        self.num_features = checked_num_features(num_features, eps, momentum)
        self.eps = float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.axis = F.as_int(axis, "axis")
        self.comm = as_communicator(comm)
        self.training = True
        self.weight: Array | None = None
        self.bias: Array | None = None
        self.running_mean: Array | None = None
        self.running_var: Array | None = None
        self.num_batches_tracked = 0
        self.grad_weight: Array | None = None
        self.grad_bias: Array | None = None
        self._dtype = dtype
        self._xp: Any = None
        self._device: Any = None
        self._pending: dict[str, Any] | None = None
        self._saved: F.SavedForBackward | None = None
        self._checked = False
        # Read once: whether to communicate for a check must not change
        # mid-run on one rank (the first check verifies all ranks agree).
        self._check_every_call = F.check_every_call()
        # The last reduced batch mean (per channel, the last finite one), the
        # same bits on every rank of the communicator it came from: the next
        # merge's center.
        self._center: Array | None = None
        self._center_comm: Any = None
        # The layer's number on its communicator, taken at its first
        # communicating call (not here: a layer built on one rank only must
        # not shift the others' numbers), and its batch-statistics calls so
        # far: the signature of every collective it makes.
        self._layer: int | None = None
        self._layer_comm: Any = None
        self._calls = 0
        if xp is not None:
            xp = array_api_compat.array_namespace(xp.zeros(0))
            self._materialize(xp, device, _resolve_dtype(xp, "float32" if dtype is None else dtype))

    # -- state ---------------------------------------------------------------
    def _materialize(self, xp: Any, device: Any, dtype: Any) -> None:
        """Create parameters and buffers; load what ``load_state_dict`` kept.

        All or nothing: if a kept value cannot be converted, the layer stays
        unmaterialized (and keeps the value) rather than carrying on with
        defaults in place of what was loaded.
        """
        c = self.num_features
        # The concrete device, never None: converting loaded values needs it.
        device = array_api_compat.device(xp.zeros((0,), dtype=dtype, device=device))
        arrays: dict[str, Array] = {}
        if self.affine:
            arrays["weight"] = xp.ones((c,), dtype=dtype, device=device)
            arrays["bias"] = xp.zeros((c,), dtype=dtype, device=device)
        if self.track_running_stats:
            arrays["running_mean"] = xp.zeros((c,), dtype=dtype, device=device)
            arrays["running_var"] = xp.ones((c,), dtype=dtype, device=device)
        count = self.num_batches_tracked
        if self._pending is not None:
            loaded = _converted(self._pending, xp, device, arrays)
            count = loaded.pop("num_batches_tracked", count)
            arrays.update(loaded)
        for key, value in arrays.items():
            setattr(self, key, value)
        self.num_batches_tracked = count
        self._xp, self._device, self._pending = xp, device, None

    def _materialize_like(self, x: Array) -> None:
        xp = array_api_compat.array_namespace(x)
        if self._dtype is not None:
            dtype = _resolve_dtype(xp, self._dtype)
        else:
            # x's work dtype: float32/float64 as x, float32 for half
            # precisions, and float64 for a byte-swapped numpy float64
            # (which compares unequal to float64 but holds its numbers).
            dtype = kernels.work_dtype(xp, x.dtype)
        self._materialize(xp, array_api_compat.device(x), dtype)

    def _expected_keys(self) -> list[str]:
        keys = list(_PARAM_KEYS) if self.affine else []
        return keys + (list(_BUFFER_KEYS) if self.track_running_stats else [])

    def state_dict(self) -> dict[str, Any]:
        """Return parameters and buffers under PyTorch's BatchNorm keys.

        A snapshot: the arrays are the layer's current ones (not copies), but
        a training forward *replaces* the running statistics (the array API
        has no portable in-place update), so call ``state_dict()`` when you
        save, not once up front. ``num_batches_tracked`` is a 0-d int64 array
        of the layer's namespace and device, as in PyTorch, so that
        ``torch.nn.BatchNorm2d.load_state_dict`` accepts the converted dict.

        Before the first forward (parameters not created yet) it returns what
        :meth:`load_state_dict` loaded, as loaded (a converted checkpoint
        saves unchanged); with nothing loaded it raises RuntimeError.
        """
        if self._xp is None:
            if self._pending is not None:
                return self._pending_state()
            raise RuntimeError(
                "SyncBatchNorm creates its parameters at the first forward; call it once, "
                "or construct it with xp=... (and device=...) to have them now"
            )
        out: dict[str, Any] = {}
        for key in self._expected_keys():
            if key == "num_batches_tracked":
                xp = self._xp
                out[key] = xp.asarray(self.num_batches_tracked, dtype=xp.int64, device=self._device)
            else:
                out[key] = getattr(self, key)
        return out

    def _pending_state(self) -> dict[str, Any]:
        """Before the first forward, after a load: the loaded values as kept
        (copies, in the library, device and dtype they were loaded from;
        ``num_batches_tracked`` a 0-d int64 array beside them), so that a
        load then save (a checkpoint converted) gives back what was loaded."""
        pending = self._pending
        assert pending is not None
        out: dict[str, Any] = {}
        arrays = [v for k, v in pending.items() if k != "num_batches_tracked"]
        for key in self._expected_keys():
            if key != "num_batches_tracked":
                # A copy: edits of the returned dict must not skip the checks
                # that loading made.
                out[key] = _snapshot(pending[key])
                continue
            count = pending[key]
            if arrays:
                xp = array_api_compat.array_namespace(arrays[0])
                device = array_api_compat.device(arrays[0])
                count = xp.asarray(count, dtype=xp.int64, device=device)
            out[key] = count
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load parameters and buffers saved by :meth:`state_dict` or by PyTorch.

        Values are copied into the layer's namespace, device and dtype
        (before the first forward they are kept and converted then): the
        layer keeps the dtype it was created with (see the class docstring),
        whatever the entries' dtype. float16 and bfloat16 entries (say
        ``torch.nn.BatchNorm2d(C).bfloat16().state_dict()``) are widened
        exactly to float32 on their side first, so they load also into a
        namespace without their dtype (numpy has no bfloat16,
        array-api-strict no float16).
        ``num_batches_tracked`` may be an int or a 0-d integer array. Loading
        is atomic: every entry is checked and converted before any is
        assigned, so a bad entry leaves the layer as it was. It also forgets
        the last forward (``backward`` needs a new one) and the merge center
        the next forward would have used. Load on every rank alike: a load
        on some ranks only leaves them with other running statistics, and
        costs the next forward one or two more statistics allreduces (some
        ranks then have a merge center and some not, which the reduced
        buffer shows every rank, so they all merge again around zero).

        Raises
        ------
        TypeError
            A value that is not an array of a real dtype, or a
            ``num_batches_tracked`` that is not an integer.
        ValueError
            Missing or unexpected keys, arrays whose shape is not
            ``(num_features,)``, non-finite values, a negative
            ``running_var``, or a negative ``num_batches_tracked``.
        """
        expected = self._expected_keys()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        if missing or unexpected:
            raise ValueError(
                f"state dict does not match SyncBatchNorm(affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}): missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        checked: dict[str, Any] = {}
        for key in expected:
            value = state[key]
            if key == "num_batches_tracked":
                checked[key] = _count_from(value)
                continue
            shape = _shape_of(value)
            if shape != (self.num_features,):
                raise ValueError(
                    f"state dict entry {key!r} has shape {shape}, expected ({self.num_features},)"
                )
            _check_entry(key, value)
            checked[key] = value
        if self._xp is None:
            self._pending = {
                k: v if k == "num_batches_tracked" else _snapshot(v) for k, v in checked.items()
            }
        else:
            current = {k: getattr(self, k) for k in checked if k != "num_batches_tracked"}
            loaded = _converted(checked, self._xp, self._device, current)
            self.num_batches_tracked = loaded.pop("num_batches_tracked", self.num_batches_tracked)
            for key, value in loaded.items():
                setattr(self, key, value)
        # What the layer derived from its old state must not outlive it: the
        # merge center (the old statistics' mean) and the last forward.
        self._center = self._center_comm = None
        self._saved = None

    # -- copies (see the class docstring) ------------------------------------
    def _copy_state(self) -> dict[str, Any]:
        """The attributes a copy starts from: this layer's, less its number on
        the communicator, its call count, its last forward (which holds the
        input itself and that forward's call) and a merge center left from
        another communicator (of no use, and its communicator may not copy)."""
        state = {**self.__dict__, "_layer": None, "_layer_comm": None, "_calls": 0, "_saved": None}
        if self._center_comm is not self.comm:
            state["_center"] = state["_center_comm"] = None
        return state

    def __copy__(self) -> SyncBatchNorm:
        new = self.__class__.__new__(self.__class__)
        new.__dict__.update(self._copy_state())
        return new

    def __deepcopy__(self, memo: dict[int, Any]) -> SyncBatchNorm:
        # Shared, not copied: the communicator often cannot be (locks, MPI
        # handles), and the namespace is a module.
        memo[id(self.comm)] = self.comm
        memo[id(self._xp)] = self._xp
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self._copy_state(), memo))
        return new

    def __getstate__(self) -> dict[str, Any]:
        if self.comm is not None and not isinstance(self.comm, SelfCommunicator):
            raise TypeError(
                f"a SyncBatchNorm synchronized over {self.comm!r} cannot be pickled (its "
                "communicator is a handle on other processes or threads): save "
                "layer.state_dict() instead, or set layer.comm = None first"
            )
        state = self._copy_state()
        # Modules cannot be pickled: the namespace goes by name.
        state["_xp"] = None if self._xp is None else self._xp.__name__
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if state["_xp"] is not None:
            state["_xp"] = importlib.import_module(state["_xp"])
        if state["comm"] is not None:  # the world of one, as a new layer has it
            world = as_communicator(None)
            if state["_center_comm"] is state["comm"]:
                state["_center_comm"] = world
            state["comm"] = world
        self.__dict__.update(state)

    # -- modes ---------------------------------------------------------------
    def train(self, mode: bool = True) -> SyncBatchNorm:
        """Switch to training (batch statistics) or, with False, eval mode."""
        self.training = bool(mode)
        return self

    def eval(self) -> SyncBatchNorm:
        """Switch to eval mode (running statistics where they are kept)."""
        return self.train(False)

    # -- passes --------------------------------------------------------------
    def _uses_batch_stats(self) -> bool:
        return self.training or not self.track_running_stats

    def forward(self, x: Array) -> Array:
        """Normalize ``x``; see the class docstring. Returns y like x."""
        ax = F.check_input(x, self.axis)
        if x.shape[ax] != self.num_features:
            raise ValueError(
                f"x has {x.shape[ax]} channels on axis {self.axis} (shape {tuple(x.shape)}), "
                f"but this SyncBatchNorm has num_features={self.num_features}"
            )
        if self._xp is None:
            self._materialize_like(x)
        batch_stats = self._uses_batch_stats()
        check = batch_stats and (not self._checked or self._check_every_call)
        label = None
        if batch_stats:
            if self._layer_comm is not self.comm:
                self._layer, self._layer_comm, self._calls = next_layer(self.comm), self.comm, 0
            self._calls += 1
            # positive ints (or None): no need for the constructor's checks
            label = CallLabel._trusted("forward", self._calls, self._layer)
        y, new_mean, new_var, saved = F.sync_batch_norm_forward(
            x,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            training=self.training and self.track_running_stats,
            momentum=self.momentum,
            eps=self.eps,
            axis=self.axis,
            comm=self.comm,
            num_batches_tracked=self.num_batches_tracked,
            check=check,
            center=self._center if self._center_comm is self.comm else None,
            label=label,
        )
        if check:
            self._checked = True
        if self.training and self.track_running_stats and saved.count:
            self.running_mean, self.running_var = new_mean, new_var
            self.num_batches_tracked += 1
        if saved.count:
            # Not saved.mean: where a batch was not finite the center keeps
            # its last finite value, or one NaN would poison every later merge.
            self._center, self._center_comm = saved.center, self.comm
        self._saved = saved
        return y

    __call__ = forward

    def backward(self, dy: Array) -> Array:
        """Return dx for the last forward; set ``grad_weight`` and ``grad_bias``.

        ``grad_weight``/``grad_bias`` are this rank's contributions (None
        without ``affine``), not reduced across ranks. A ``dy`` that is not
        an array is a TypeError. The forward kept its x itself (not a copy):
        x must not have changed since, or the gradients belong to the new
        values (numpy has no version counter to catch it, unlike autograd).
        """
        if not array_api_compat.is_array_api_obj(dy):
            raise TypeError(f"dy must be an array, got {type(dy).__name__}")
        if self._saved is None:
            raise NoForwardError("backward called before any forward: run a training forward first")
        if not self._saved.batch_stats:
            raise NoForwardError(
                "the last forward normalized with running statistics (eval mode), which "
                "SyncBatchNorm.backward does not differentiate; run a training forward, or "
                "use arraysyncbn.sync_batch_norm_backward for the frozen-statistics gradient"
            )
        dx, self.grad_weight, self.grad_bias = F.sync_batch_norm_backward(dy, self._saved)
        return dx

    def __repr__(self) -> str:
        return (
            f"SyncBatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
            f"axis={self.axis}, comm={self.comm!r})"
        )
