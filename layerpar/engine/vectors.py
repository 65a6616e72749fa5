"""The vector operations of the network's MGRIT apps: torch tensors of one
state shape, and how a state becomes a message (packed into the core's byte
buffer, unpacked from it).
"""
import warnings

import numpy as np
import torch

_NUMPY_DTYPES = {
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.float16: np.float16,
}


class TorchVectors:
    """The vector operations of an MGRIT app for tensors of one shape (set
    with ``configure`` before each solve)."""

    def configure(self, shape, dtype, device):
        if dtype not in _NUMPY_DTYPES:
            raise ValueError(f"dtype={dtype}: layerpar supports {sorted(map(str, _NUMPY_DTYPES))}")
        self.shape = tuple(shape)
        self.dtype = dtype
        self.device = device
        self.numel = int(np.prod(self.shape, dtype=np.int64))
        self._np_dtype = _NUMPY_DTYPES[dtype]

    def zeros(self):
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device)

    def clone(self, u):
        return u.clone()

    def sum(self, a, x, b, y):
        if b != 1.0:
            y.mul_(b)
        return y.add_(x, alpha=a)

    def norm(self, u):
        return float(torch.linalg.vector_norm(u))

    def bufsize(self):
        return self.numel * np.dtype(self._np_dtype).itemsize

    def pack(self, u, buf):
        # one copy into the message, straight from the device memory
        torch.frombuffer(buf, dtype=self.dtype, count=self.numel).copy_(u.detach().reshape(-1))

    def unpack(self, buf):
        # the message lives only during the call: one copy out of it
        a = np.frombuffer(buf, dtype=self._np_dtype, count=self.numel)
        if self.device.type == "cpu":
            return torch.from_numpy(a.copy()).reshape(self.shape)
        with warnings.catch_warnings():
            # read-only view of the message, only read by the copy to the device
            warnings.simplefilter("ignore", UserWarning)
            view = torch.from_numpy(a)
        return view.reshape(self.shape).to(self.device)
