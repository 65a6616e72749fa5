"""check_app: the self-test of an app's clone, sum, norm and pack/unpack."""
import numpy as np
import pytest

from braid_ext import NumpyApp, check_app
from braid_ext.examples.dahlquist import Dahlquist
from braid_ext.examples.rotation import DampedRotation


class Plane(NumpyApp):
    """A numpy app on R^3 whose initial state has no exactly representable
    float32 entries, so that lossy packing shows."""

    def __init__(self):
        super().__init__((3,))

    def init(self, t, index):
        return np.array([1.0, 0.1, -2.0 / 3.0])

    def step(self, u, status):
        return u


class SharedClone(Plane):
    def clone(self, u):
        return u  # not a copy: changing the clone changes u


class Float32Pack(Plane):
    def bufsize(self):
        return 3 * 4

    def pack(self, u, buf):
        np.frombuffer(buf, dtype=np.float32, count=3)[:] = u

    def unpack(self, buf):
        return np.frombuffer(buf, dtype=np.float32, count=3).astype(np.float64)


class DropsLastEntry(Plane):
    def pack(self, u, buf):
        np.frombuffer(buf, dtype=np.float64, count=2)[:] = u[:2]

    def unpack(self, buf):
        v = np.zeros(3)
        v[:2] = np.frombuffer(buf, dtype=np.float64, count=2)
        return v


class NegativeNorm(Plane):
    def norm(self, u):
        return -1.0


class NaNNorm(Plane):
    def norm(self, u):
        return float("nan")


class WrongSum(Plane):
    def sum(self, a, x, b, y):
        y += a * x  # forgets beta
        return y


class BadBufsize(Plane):
    def bufsize(self):
        return 8  # too small for 3 doubles: pack raises


class RaisingUnpack(Plane):
    def unpack(self, buf):
        raise KeyError("no unpack today")


@pytest.mark.parametrize("app", [Dahlquist(-1.0), Dahlquist(2.0, scheme="forward", u0=-3.5),
                                 DampedRotation(), DampedRotation(u0=(0.3, -0.7)), Plane()],
                         ids=["dahlquist", "dahlquist-fwd", "rotation", "rotation-u0", "plane"])
@pytest.mark.parametrize("t", [0.0, 1.5])
def test_example_apps_pass(app, t):
    check_app(app, t)


@pytest.mark.parametrize("app,message", [
    (SharedClone(), "clone"),
    (Float32Pack(), "unpack\\(pack\\(u\\)\\) differs"),
    (DropsLastEntry(), "unpack\\(pack\\(u\\)\\) differs"),
    (NegativeNorm(), "norm"),
    (NaNNorm(), "norm"),
    (WrongSum(), "sum"),
], ids=["shared-clone", "float32-pack", "drops-entry", "negative-norm", "nan-norm", "wrong-sum"])
def test_broken_app_fails_with_value_error(app, message):
    with pytest.raises(ValueError, match=message) as info:
        check_app(app)
    assert type(app).__name__ in str(info.value)


def test_app_exception_passes_through_unchanged():
    with pytest.raises(KeyError, match="no unpack today"):
        check_app(RaisingUnpack())
    with pytest.raises(ValueError):  # numpy: buffer is smaller than requested size
        check_app(BadBufsize())


def test_app_lacking_a_method_is_a_type_error():
    class NoPack(Plane):
        pack = None

    with pytest.raises(TypeError, match="pack"):
        check_app(NoPack())
