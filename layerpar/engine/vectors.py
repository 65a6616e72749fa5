"""The vector operations of the network's MGRIT apps: torch tensors of one
state shape, and how a state becomes a message.

Precision: the state's dtype decides (float64, float32, bfloat16, float16);
the norms the solver compares are computed in float32 for the half types
(float64 and float32 states in their own precision).  The adjoint of a
half-precision state is carried in float32 (``adjoint_dtype``).

Messages (``layerpar.engine.transport``): on the host path the solver's
own buffers (kept from solve to solve) receive a copy of the state; on the
device path, and on the host path where CUDA is available, the app owns the
buffers (``alloc_buffer``: tensors on the state's device, or pinned host
memory), so that MPI reads the device memory itself.
"""
import warnings

import numpy as np
import torch

from layerpar.engine.transport import as_bytes, byte_buffer, ready, resolve

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
HALF = (torch.bfloat16, torch.float16)


def adjoint_dtype(dtype):
    """The dtype the adjoint of a ``dtype`` state is carried in: float32 for
    the half types (their adjoint sums would lose the small updates of many
    layers), the state's own otherwise."""
    return torch.float32 if dtype in HALF else dtype


def norm_dtype(dtype):
    """The dtype the norm of a ``dtype`` state is computed in (the
    ``dtype`` argument of ``torch.linalg.vector_norm``): float32 for the
    half types, None (the state's own) otherwise."""
    return torch.float32 if dtype in HALF else None


def check_dtype(dtype):
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype}: layerpar supports {', '.join(map(str, DTYPES))}")


class TorchVectors:
    """The vector operations of an MGRIT app for tensors of one shape (set
    with ``configure`` before each solve)."""

    transport = "host"

    def set_transport(self, kind):
        """Collective in effect (call alike on every rank, before the
        solvers are built): the message path, an entry of
        ``transport.KINDS``."""
        self.transport = resolve(kind)
        if self.transport == "device" or torch.cuda.is_available():
            self.alloc_buffer = self._alloc_buffer
        else:
            self.__dict__.pop("alloc_buffer", None)

    def configure(self, shape, dtype, device):
        check_dtype(dtype)
        self.shape = tuple(shape)
        self.dtype = dtype
        self.device = torch.device(device)
        self.numel = 1
        for s in self.shape:
            self.numel *= int(s)
        self.nbytes = self.numel * torch.empty((), dtype=dtype).element_size()
        self._norm_dtype = norm_dtype(dtype)

    def zeros(self):
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device)

    def clone(self, u):
        return u.clone()

    def sum(self, a, x, b, y):
        if b != 1.0:
            y.mul_(b)
        return y.add_(x, alpha=a)

    def norm(self, u):
        return float(torch.linalg.vector_norm(u, dtype=self._norm_dtype))

    def bufsize(self):
        return self.nbytes

    def _alloc_buffer(self, nbytes):
        """A message buffer for the solver: a uint8 tensor on the state's
        device (device path) or in pinned host memory, and its address."""
        buf = byte_buffer(nbytes, self.device if self.transport == "device"
                          else torch.device("cpu"))
        return buf, buf.data_ptr()

    def pack(self, u, buf):
        # one copy into the message, straight from the device memory
        src = as_bytes(u.detach().contiguous())
        if isinstance(buf, torch.Tensor):
            buf[:self.nbytes].copy_(src)
            ready(buf.device)  # a no-op for host memory
        else:
            torch.frombuffer(buf, dtype=torch.uint8, count=self.nbytes).copy_(src)

    def unpack(self, buf):
        # the message lives only during the call: one copy out of it
        out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        if isinstance(buf, torch.Tensor):
            as_bytes(out).copy_(buf[:self.nbytes])
            return out
        a = np.frombuffer(buf, dtype=np.uint8, count=self.nbytes)
        if self.device.type == "cpu":
            as_bytes(out).numpy()[:] = a
            return out
        with warnings.catch_warnings():
            # read-only view of the message, only read by the copy to the device
            warnings.simplefilter("ignore", UserWarning)
            view = torch.from_numpy(a)
        as_bytes(out).copy_(view)
        return out
