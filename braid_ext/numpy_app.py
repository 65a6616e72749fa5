"""Vector operations for apps whose state is a numpy array of fixed shape."""
import numpy as np


class NumpyApp:
    """Base class: clone, sum, norm and pack/unpack for numpy arrays of one
    shape and dtype.  A subclass provides ``init(t, index)`` and
    ``step(u, status)`` (returning the new state; the solver adds the FAS
    right-hand side unless the class sets ``adds_rhs = True``)."""

    def __init__(self, shape, dtype=np.float64):
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self._nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def clone(self, u):
        """A copy of the vector ``u``."""
        return u.copy()

    def sum(self, a, x, b, y):
        """y <- a*x + b*y, in place in ``y``; returns ``y``."""
        if b != 1.0:
            y *= b
        if a == 1.0:
            y += x
        else:
            y += a * x
        return y

    def norm(self, u):
        """The Euclidean norm of ``u`` (a float)."""
        return float(np.sqrt(np.vdot(u, u).real))

    def bufsize(self):
        """Bytes of a packed vector (the message size)."""
        return self._nbytes

    def pack(self, u, buf):
        """Write ``u`` into the writable buffer ``buf`` of ``bufsize()`` bytes."""
        np.frombuffer(buf, dtype=self.dtype, count=u.size)[:] = u.reshape(-1)

    def unpack(self, buf):
        """A new vector from the buffer ``buf`` that ``pack`` wrote."""
        return np.frombuffer(buf, dtype=self.dtype, count=self._nbytes // self.dtype.itemsize)\
            .reshape(self.shape).copy()
