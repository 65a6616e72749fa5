"""The network's MGRIT solvers: a cache of forward/adjoint solver pairs.

A pair of ``braid_ext.Solver`` objects (forward in layer-time, adjoint in
reversed layer-time) serves one state shape/dtype/device and one set of
options.  A pass with another batch size or with other options (an exact
evaluation pass) and back returns to the same pair, with its warm states
(one-shot), as long as no more than ``capacity`` pairs are kept (the least
recently used is closed).  Every method that builds or closes solvers is
collective: every rank makes the same calls in the same order.

Between sweeps the solvers keep only the points read later (store='C'): the
C-points (a warm start's F-relaxation recomputes the F-points from them), the
last point (u_N, or the adjoint's dloss/du_0) and on one level the two ends.
The forward F-points the adjoint needs live in the layers' graphs (their
inputs) until backward frees them, and an adjoint point is only read by the
next step.
"""
from braid_ext import Solver

_STORE = "C"


def _key(meta, fwd, bwd):
    return (meta, repr(sorted(fwd.items())), repr(sorted(bwd.items())))


class SolverPairs:
    """Forward/adjoint solver pairs over ``comm`` for ``nlayers`` layers on
    [0, T], stepping with ``apps`` (forward app, adjoint app).  The pair for
    the options (``fwd``, ``bwd``) is built at once, so that a bad option
    raises here, on every rank."""

    def __init__(self, apps, comm, nlayers, T, fwd, bwd, *, capacity, store=_STORE,
                 wait="busy"):
        self.apps = apps
        self.wait = wait  # how the solvers' waits wait ('busy' or 'sleep')
        self.store = store
        self.comm = comm
        self.nlayers, self.T = nlayers, T
        self.capacity = capacity
        self._pairs = {}   # pairs not in use, by key (least recently used first)
        self._options = {}  # key -> (fwd, bwd) options
        self.fwd = self.bwd = None
        self.fwd, self.bwd = self._new_pair(fwd, bwd)
        # the pair in use is bound to a state meta at the first pass
        self._key = _key(None, fwd, bwd)
        self._options[self._key] = (fwd, bwd)
        self._last = (None, None, None)  # the last use's (meta, fwd, bwd)

    def _new_solver(self, opts, reverse):
        t0, t1 = (self.T, 0.0) if reverse else (0.0, self.T)
        return Solver(self.apps[1 if reverse else 0], self.comm, t0, t1, self.nlayers, **opts,
                      reverse=reverse, store=self.store, final_sweep=True, wait=self.wait)

    def _new_pair(self, fwd, bwd):
        new_fwd = self._new_solver(fwd, reverse=False)
        try:
            new_bwd = self._new_solver(bwd, reverse=True)
        except BaseException:
            new_fwd.close()
            raise
        return new_fwd, new_bwd

    def cached(self):
        """The pairs kept but not in use, least recently used first."""
        return list(self._pairs.values())

    def layout(self):
        """Which rank holds which layer (``braid_ext.Layout``)."""
        return self.fwd.layout()

    def close(self):
        """Collective: close every solver (and the states it holds)."""
        pairs = list(self._pairs.values()) + [(self.fwd, self.bwd)]
        self._pairs = {}
        self.fwd = self.bwd = None
        self._last = (None, None, None)
        for pair in pairs:
            for solver in pair:
                if solver is not None:
                    solver.close()

    def use(self, meta, fwd, bwd):
        """Collective: make the pair for the state ``meta`` and the options
        (``fwd``, ``bwd``) the one in use: from the cache, with its warm
        states, or new.  The pair in use goes to the cache (unless it never
        solved); past ``capacity`` pairs the least recently used is closed.
        Every rank switches alike (same calls, same order).  The options
        are dicts that are replaced, never changed in place: the same
        objects with the same state meta are the pair in use, found without
        forming the key."""
        if meta == self._last[0] and fwd is self._last[1] and bwd is self._last[2]:
            return
        self._use(meta, fwd, bwd)
        self._last = (meta, fwd, bwd)

    def _use(self, meta, fwd, bwd):
        key = _key(meta, fwd, bwd)
        if key == self._key:
            return
        if self._key[0] is None and key[1:] == self._key[1:]:
            self._options[key] = self._options.pop(self._key)
            self._key = key  # the pair built at construction: still unused
            return
        pair = self._pairs.pop(key, None)
        if pair is None:
            pair = self._new_pair(fwd, bwd)
            if meta == self._key[0]:  # same states, other options (e.g. iterations)
                _carry_states((self.fwd, self.bwd), pair)
        self._options[key] = (fwd, bwd)
        old = (self.fwd, self.bwd)
        if self._key[0] is None:
            for solver in old:
                solver.close()
            self._options.pop(self._key, None)
        else:
            self._pairs[self._key] = old
        while len(self._pairs) >= self.capacity:
            gone = next(iter(self._pairs))
            for solver in self._pairs.pop(gone):
                solver.close()
            self._options.pop(gone, None)
        self.fwd, self.bwd = pair
        self._key = key

    # ---- warm states (one-shot): saved and restored ---------------------------
    def warm_states(self):
        """This rank's solver states: a list of (state meta, forward options,
        backward options, {"fwd": {index: tensor}, "bwd": {index: tensor}}
        at each solver's stored points), one per pair used for a state, the
        cached pairs from the least recently used, the pair in use last; the
        same pairs on every rank, with no points where a solver holds no
        solution or keeps no point on this rank.  Local."""
        out = []
        pairs = list(self._pairs.items()) + [(self._key, (self.fwd, self.bwd))]
        for key, pair in pairs:
            if key[0] is None:
                continue
            held = {}
            for name, solver in zip(("fwd", "bwd"), pair):
                lo, hi = solver.local_range(0)
                try:
                    held[name] = {i: solver.get(i).detach().clone()
                                  for i in range(lo, hi + 1) if solver.is_stored(i)}
                except ValueError:  # no solution held (e.g. no adjoint solve yet)
                    held[name] = {}
            # listed even without points: a rank that keeps no point (store
            # 'C') lists the pairs the others list
            out.append((key[0], dict(self._options[key][0]), dict(self._options[key][1]),
                        held))
        return out

    def load_warm_states(self, states, fwd, bwd, *, owned_only=False):
        """Collective: rebuild the pairs of ``warm_states()`` (saved on the
        same number of ranks) with their states, the last one in use; the
        pairs held so far are closed.  With no states, a fresh pair for the
        options (``fwd``, ``bwd``).  ``owned_only``: the states may hold
        other ranks' points too (merged from every rank); only this rank's
        stored points are installed.  States that hold F-points too (saved by
        solvers that kept every point) load alike: the warm start recomputes
        the F-points."""
        self.close()
        pair = key = None
        for meta, f, b, held in states:
            if pair is not None:
                self._pairs[key] = pair
            pair = (self._new_solver(f, reverse=False), self._new_solver(b, reverse=True))
            key = _key(meta, f, b)
            self._options[key] = (f, b)
            for name, solver in zip(("fwd", "bwd"), pair):
                lo, hi = solver.local_range(0)
                for i, u in held[name].items():
                    try:
                        solver.set(int(i), u.detach().clone())
                    except ValueError:
                        # an F-point of this rank (saved by a solver that kept
                        # every point; the warm start recomputes it), or with
                        # owned_only another rank's point
                        if not (owned_only or lo <= int(i) <= hi):
                            raise
        if pair is None:  # nothing saved: a fresh pair for the current options
            pair = (self._new_solver(fwd, reverse=False), self._new_solver(bwd, reverse=True))
            key = _key(None, fwd, bwd)
            self._options[key] = (fwd, bwd)
        self.fwd, self.bwd = pair
        self._key = key
        self._last = (None, None, None)


def _carry_states(old, new):
    """Local: the warm states of a pair, copied into a new pair for the same
    states that warm-starts on more than one level (a change of the iteration
    count keeps a one-shot run warm)."""
    for src, dst in zip(old, new):
        if not (dst.options["warm_start"] and dst.options["max_levels"] > 1):
            continue
        lo, hi = src.local_range(0)
        try:
            held = {i: src.get(i) for i in range(lo, hi + 1) if src.is_stored(i)}
        except ValueError:  # no solution held
            continue
        for i, u in held.items():
            dst.set(i, u.detach().clone())
