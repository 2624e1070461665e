"""A simulated accelerator: runs turnrl with the model "on a device" on a machine without one, enforcing the
device rules CUDA enforces, so device-placement bugs show up in CPU tests (tests/test_devices.py).

Inside `simulated_accelerator()`, a tensor moved or created on the `meta` device becomes a `DeviceTensor`: it
reports `device(type='meta')` and holds a real CPU tensor, on which every op runs. Each op checks its inputs as
CUDA would: a device tensor and a host tensor with dimensions in one op raise `DeviceMismatch` (0-dim host
tensors, copies and CPU index tensors are allowed, as in CUDA); a random op for the device with a CPU generator
raises; results of device ops are device tensors; `.cpu()`, `.item()` and `.tolist()` come back to the host. So
`--model.device meta` under it trains for real, and every place that would fail on a GPU fails here.

Written by hand because no library does this: torch's FakeTensorMode checks devices but holds no data (turnrl's
rollouts depend on sampled values), and a CPU build of torch cannot create CUDA tensors at all.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

DEVICE = torch.device("meta")
# ops CUDA runs with host tensors among their inputs: copies between devices, CPU index tensors
_MIXED_OK = {"copy_", "_to_copy", "index", "index_put_", "_index_put_impl_", "_foreach_copy_", "set_",
             "_has_compatible_shallow_copy_type"}
_FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray}
_active = 0


class DeviceMismatch(RuntimeError):
    """An op mixed device and host tensors, or drew device randomness from a CPU generator: CUDA would raise."""


class DeviceTensor(torch.Tensor):
    """A tensor 'on the device': reports `meta`, holds its values in `.elem` (CPU)."""

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        if elem.device.type != "cpu":
            raise RuntimeError(f"a simulated device tensor holds CPU values, got one on {elem.device}")
        out = torch.Tensor._make_wrapper_subclass(cls, elem.size(), strides=elem.stride(),
                                                  storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                  layout=elem.layout, device=DEVICE, requires_grad=elem.requires_grad)
        out.elem = elem
        return out

    def __repr__(self):
        return f"DeviceTensor({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"a simulated device tensor reached {func} outside simulated_accelerator()")


def _unwrap(x):
    return x.elem if isinstance(x, DeviceTensor) else x


def _wrap(x):
    return DeviceTensor(x) if isinstance(x, torch.Tensor) and not isinstance(x, DeviceTensor) else x


def _writes_first(func) -> bool:
    """Whether the op writes into its first argument (add_, copy_, __iand__, out= variants aside)."""
    arguments = func._schema.arguments
    alias = arguments[0].alias_info if arguments else None
    return alias is not None and alias.is_write


class _Dispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        leaves = pytree.tree_leaves((args, kwargs))
        if any(isinstance(x, torch.Tensor) and not isinstance(x, DeviceTensor) and x.device.type == DEVICE.type
               for x in leaves):  # made below the modes: its values are gone; fail rather than compute on garbage
            raise RuntimeError(f"{func}: a tensor without data on the simulated device (made by torch below the "
                               "Python dispatch modes); turnrl.devcheck cannot run this op")
        on_device = any(isinstance(x, DeviceTensor) for x in leaves)
        host = [tuple(x.shape) for x in leaves
                if isinstance(x, torch.Tensor) and not isinstance(x, DeviceTensor) and x.dim() > 0]
        device = kwargs.get("device")
        if device is None:  # aten.to.device takes it positionally
            device = next((a for a in args if isinstance(a, torch.device)), None)
        device = None if device is None else torch.device(device)
        to_host = device is not None and device.type == "cpu"
        to_device = device is not None and device.type == DEVICE.type
        if on_device and host and name not in _MIXED_OK and not to_host:
            raise DeviceMismatch(f"{func}: expected all tensors on one device, got device tensors and host tensors "
                                 f"of shapes {host}")
        generator = kwargs.get("generator")
        if generator is not None and (to_device or (device is None and on_device)) and generator.device.type == "cpu":
            raise DeviceMismatch(f"{func}: a CPU generator for random numbers on the device")
        target = args[0] if args else None
        args, kwargs = pytree.tree_map(_unwrap, (args, kwargs))
        if to_device:
            if "device" in kwargs:
                kwargs["device"] = torch.device("cpu")
            args = tuple(torch.device("cpu") if isinstance(a, torch.device) else a for a in args)
        out = func(*args, **kwargs)
        if _writes_first(func) and isinstance(target, torch.Tensor):  # in place: the target keeps its device
            return target
        if to_host or name == "_local_scalar_dense":
            return out
        if to_device or on_device:
            return pytree.tree_map(_wrap, out)
        return out


class _Functions(TorchFunctionMode):
    """`torch.tensor(data, device=...)` copies below the dispatch modes: build it on the host, then move it; and
    `.tolist()`, which torch refuses for tensor subclasses, reads the values as it does on CUDA."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.tolist and isinstance(args[0], DeviceTensor):  # works on CUDA (a sync)
            return args[0].elem.tolist()
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and isinstance(args[0], DeviceTensor):
            # torch turns a list index into a tensor on the indexed tensor's device below the dispatch modes; a CPU
            # index tensor is what CUDA receives in effect (and accepts)
            index = args[1]
            index = tuple(torch.tensor(i) if isinstance(i, list) else i for i in index) if isinstance(index, tuple) \
                else torch.tensor(index) if isinstance(index, list) else index
            args = (args[0], index, *args[2:])
        device = kwargs.get("device")
        if func in _FROM_DATA and device is not None and torch.device(device).type == DEVICE.type:
            return func(*args, **{k: v for k, v in kwargs.items() if k != "device"}).to(device)
        return func(*args, **kwargs)


class _Autocast(torch.autocast):
    """torch.autocast, disabled on the simulated device (whose ops run on CPU tensors inside the dispatch mode)."""

    def __init__(self, device_type, *args, **kwargs):
        if device_type == DEVICE.type:
            device_type, kwargs = "cpu", {**kwargs, "enabled": False}
        super().__init__(device_type, *args, **kwargs)


def _on_host(query):
    """torch.is_autocast_enabled / get_autocast_dtype asked about the simulated device answer for a device without
    autocast (torch raises for `meta`)."""
    def wrapped(device_type=None, *args):
        if device_type == DEVICE.type:
            return False if query is torch.is_autocast_enabled else torch.float32
        return query(*(() if device_type is None else (device_type,)), *args)
    return wrapped


@contextlib.contextmanager
def simulated_accelerator():
    """Inside it, `meta` is a device with data that checks CUDA's placement rules (module docstring)."""
    global _active
    saved = torch.autocast, torch.is_autocast_enabled, torch.get_autocast_dtype
    torch.autocast = _Autocast
    torch.is_autocast_enabled, torch.get_autocast_dtype = _on_host(saved[1]), _on_host(saved[2])
    _active += 1
    try:
        with _Functions(), _Dispatch():
            yield
    finally:
        _active -= 1
        torch.autocast, torch.is_autocast_enabled, torch.get_autocast_dtype = saved


def simulation_active() -> bool:
    return _active > 0
