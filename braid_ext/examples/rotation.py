"""A damped rotation in the plane, u' = A u with A = [[-d, -w], [w, -d]],
stepped with the (nonlinear in the step size) Cayley/implicit-midpoint map
or forward Euler, plus a cubic damping term that makes the step nonlinear in
u:  u' = A u - c |u|^2 u.

    mpiexec -n 2 python -m braid_ext.examples.rotation
"""
import numpy as np

from braid_ext.numpy_app import NumpyApp


class DampedRotation(NumpyApp):
    def __init__(self, omega=2.0, damping=0.1, cubic=0.5, u0=(1.0, 0.0)):
        super().__init__((2,))
        self.a = np.array([[-damping, -omega], [omega, -damping]])
        self.cubic = cubic
        self.u0 = np.array(u0, dtype=float)

    def rhs(self, u):
        return self.a @ u - self.cubic * np.dot(u, u) * u

    def init(self, t, index):
        return self.u0.copy() if index == 0 else np.zeros(2)

    def step(self, u, status):
        # explicit midpoint (second order), nonlinear in u
        dt = status.t_stop - status.t_start
        half = u + 0.5 * dt * self.rhs(u)
        return u + dt * self.rhs(half)

    def sequential(self, t_start, t_stop, nsteps):
        dt = (t_stop - t_start) / nsteps
        out = np.empty((nsteps + 1, 2))
        out[0] = self.u0
        for i in range(nsteps):
            u = out[i]
            half = u + 0.5 * dt * self.rhs(u)
            out[i + 1] = u + dt * self.rhs(half)
        return out


if __name__ == "__main__":
    from braid_ext.examples._main import main
    main(lambda args: DampedRotation(), default_nsteps=1024, default_tstop=4.0)
