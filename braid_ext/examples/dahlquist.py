"""The scalar test equation u' = lambda*u, u(0) = 1, with backward Euler
(A-stable, the classic MGRIT test) or forward Euler.

    mpiexec -n 2 python -m braid_ext.examples.dahlquist --nsteps 4096
"""
import numpy as np

from braid_ext.numpy_app import NumpyApp


class Dahlquist(NumpyApp):
    def __init__(self, lam=-1.0, scheme="backward", u0=1.0):
        if scheme not in ("backward", "forward"):
            raise ValueError(f"scheme={scheme!r}: must be 'backward' or 'forward'")
        super().__init__((1,))
        self.lam, self.scheme, self.u0 = lam, scheme, u0

    def init(self, t, index):
        return np.full(1, self.u0 if index == 0 else 0.0)

    def step(self, u, status):
        dt = status.t_stop - status.t_start
        if self.scheme == "backward":
            u /= 1.0 - self.lam * dt
        else:
            u *= 1.0 + self.lam * dt
        return u

    def sequential(self, t_start, t_stop, nsteps):
        """All states u_0..u_N by plain sequential stepping (the reference)."""
        dt = (t_stop - t_start) / nsteps
        g = 1.0 / (1.0 - self.lam * dt) if self.scheme == "backward" else 1.0 + self.lam * dt
        out = np.empty(nsteps + 1)
        out[0] = self.u0
        for i in range(1, nsteps + 1):
            out[i] = out[i - 1] * g
        return out


if __name__ == "__main__":
    from braid_ext.examples._main import main
    main(lambda args: Dahlquist(lam=args.lam), default_nsteps=4096, default_tstop=1.0)
