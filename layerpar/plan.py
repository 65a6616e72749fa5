"""``layerpar plan``: the predicted time per training step of each mode for a
configuration on P ranks (layerpar.perfmodel with a calibration of the
configured step module), and the fastest choice.

Exact modes (serial, pipeline) give the gradients of serial back-propagation;
the MGRIT modes (layer-parallel, one-shot) give inexact ones whose accuracy
depends on the iterations: the recommendation names the fastest exact mode
as well as the fastest overall.
"""
import math

from braid_ext import hierarchy
from layerpar import perfmodel as pm


def _setting_name(mode, P, kw):
    if mode == "serial":
        return f"serial             P={P}"
    if mode == "pipeline":
        return f"pipeline           P={P} microbatches={kw['microbatches']}"
    return (f"{mode:<18} P={P} levels={kw['max_levels']} cfactor={kw['cfactor']} "
            f"relax={kw['relax']} skip={kw['skip']} iters={kw['fwd_iters']}/{kw['bwd_iters']}")


def candidates(config, P):
    """(mode, ranks, options) to compare: the configured MGRIT settings, a
    few alternatives, the pipeline with several micro-batch counts, and each
    on fewer ranks (powers of two below P)."""
    from layerpar.config import MIN_COARSE  # the networks' (LayerParallel's default)

    g, N = config["mgrit"], config["model"]["nlayers"]
    B = config["data"]["batch_size"]
    mode = g["mode"] if g["mode"] != "serial" else "layer-parallel"
    fwd = g["fwd_iters"] or (1 if mode == "one-shot" else 2)
    bwd = g["bwd_iters"] or 1
    base = dict(max_levels=g["max_levels"], cfactor=g["cfactor"], relax=g["relax"],
                skip=g["skip"], cycle=g["cycle"], fwd_iters=fwd, bwd_iters=bwd)
    # the other relaxation: F with the skipped down-cycle, or FCF without
    other = dict(base, relax="FCF", skip=False) if (base["relax"], base["skip"]) == ("F", True) \
        else dict(base, relax="F", skip=True)
    mg = [base, other, dict(base, max_levels=base["max_levels"] + 1),
          dict(base, cfactor=2 if base["cfactor"] != 2 else 8)]
    ranks = sorted({P} | {2 ** k for k in range(int(math.log2(P)) + 1)})
    out = []
    for p in ranks:
        if p > N:
            continue
        out.append(("serial", p, {}))
        for m in sorted({2, 4, 8, 2 * p, g["microbatches"]} - {1}):
            if m <= B:
                out.append(("pipeline", p, {"microbatches": m}))
        seen = []
        for kw in mg:
            # the hierarchy the core builds: more levels than fit are not built
            levels = hierarchy(N, max_levels=kw["max_levels"], cfactor=kw["cfactor"],
                               min_coarse=MIN_COARSE)
            kw = dict(kw, max_levels=len(levels))
            if len(levels) > 1 and kw not in seen:
                seen.append(kw)
                for md in (mode, "one-shot" if mode != "one-shot" else "layer-parallel"):
                    k = dict(kw)
                    if md == "one-shot":
                        k["fwd_iters"] = 1
                    elif mode == "one-shot":
                        k["fwd_iters"] = 2
                    if (md, p, k) not in out:
                        out.append((md, p, k))
    return out


def predict(cal, config, P):
    """[(name, mode, ranks, seconds per step)] for every candidate, fastest first."""
    N = config["model"]["nlayers"]
    rows = []
    for mode, p, kw in candidates(config, P):
        t = pm.training_step(cal, N, p, mode, batch=config["data"]["batch_size"], **kw)["time"]
        rows.append((_setting_name(mode, p, kw), mode, p, t))
    rows.sort(key=lambda r: r[3])
    return rows


def noisy_ranking(rows, spread):
    """(fastest, rival) when timings of relative ``spread`` cannot rank them:
    the fastest row and the fastest of another mode, predicted less than
    two spreads apart (each prediction may be off by the spread, the two in
    opposite directions); None when they can, or the spread is unknown."""
    if spread is None or not rows:
        return None
    best = rows[0]
    rival = next((r for r in rows[1:] if r[1] != best[1]), None)
    if rival is None or rival[3] > best[3] * (1 + 2 * spread):
        return None
    return best, rival


def spread_line(spread):
    """The calibration's spread, as a line of text."""
    if spread is None:
        return "calibration spread: not recorded (a calibration file written before it was)"
    return (f"calibration spread: {spread:.1%} (each timing: the fastest of up to "
            f"{pm.SETTLE_TRIES} blocks, whose {pm.SETTLE_KEEP} fastest agree within this)")


def report(rows, P, spread=None):
    """The table and the recommendation, as lines of text; a warning last
    when the calibration's ``spread`` is too large to rank the modes."""
    base = next(t for _, mode, p, t in rows if mode == "serial" and p == 1)
    lines = [f"{'setting':<78} {'s/step':>10} {'speed-up':>9}"]
    for name, _, _, t in rows:
        lines.append(f"{name:<78} {t:10.4g} {base / t:8.2f}x")
    rows = [(" ".join(name.split()),) + tuple(r) for name, *r in rows]
    best = rows[0]
    exact = next(r for r in rows if r[1] in ("serial", "pipeline"))
    lines.append("")
    lines.append(f"fastest: {best[0]} ({base / best[3]:.2f}x over serial on one rank)")
    if best[1] in ("serial", "pipeline"):
        advice = "use the pipeline" if best[1] == "pipeline" else "train serially"
        if best[2] < P:
            advice += f" on {best[2]} rank{'s' * (best[2] > 1)}: use fewer ranks"
        lines.append(f"recommendation: {advice} (exact gradients)")
    else:
        advice = f"use {best[1]}"
        if best[2] < P:
            advice += f" on {best[2]} rank{'s' * (best[2] > 1)}: use fewer ranks"
        lines.append(f"recommendation: {advice} (inexact gradients: check the residuals); "
                     f"fastest exact: {exact[0]} ({base / exact[3]:.2f}x)")
    noisy = noisy_ranking(rows, spread)
    if noisy:
        (a, _, _, ta), (b, _, _, tb) = noisy
        lines.append(f"warning: the calibration is too noisy to rank the modes: its timings "
                     f"spread by {spread:.0%}, and {a} ({ta:.4g} s) and {b} ({tb:.4g} s) are "
                     "predicted closer than that allows; calibrate again on a quiet machine "
                     "(or use --calibration with a file made on one)")
    return lines


def state_setting(config):
    """(step module, state shape, dtype) of a configuration: the opening
    applied to a zero batch gives the state shape."""
    import torch
    from mpi4py import MPI

    from layerpar.models import factories
    from layerpar.training.build import DTYPES, load_data

    data = load_data(config, MPI.COMM_SELF)
    opening, step, _ = factories(config["model"], data.input_shape, data.num_classes)
    dtype = DTYPES[config["data"]["dtype"]]
    B = config["data"]["batch_size"]
    with torch.no_grad():
        state = opening().to(dtype)(torch.zeros((B,) + tuple(data.input_shape), dtype=dtype))
    if isinstance(state, tuple):  # an opening that derives the context: (state, context)
        state = state[0]
    return step(0), tuple(state.shape), dtype


def main(*, config_path, ranks, overrides=(), calibration=None, save=None, comm=None,
         out=print):
    """Collective on ``comm`` (the messages are measured between ranks 0
    and 1 when it has two); ``out`` prints a line (rank 0's)."""
    from layerpar.config import check_ranks, resolve

    if not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"--ranks {ranks!r}: the number of ranks must be an integer >= 1")
    config = resolve(config_path, overrides)
    N = config["model"]["nlayers"]
    if ranks > N:
        raise ValueError(f"--ranks {ranks}: more ranks than model.nlayers = {N}")
    check_ranks(config, ranks)
    if calibration:
        cal = pm.Calibration.load(calibration)
        source = f"calibration {calibration}"
    else:
        F, shape, dtype = state_setting(config)
        cal = pm.calibrate(F, shape, dtype, comm=comm, overhead=True)
        source = f"calibrated now: state {shape} {str(dtype).replace('torch.', '')}"
        if save and (comm is None or comm.Get_rank() == 0):
            cal.save(save)
    out(f"{source}; messages: {cal.info.get('messages', '?')} "
        f"(latency {cal.latency:.3g} s, bandwidth {cal.bandwidth:.3g} B/s)")
    out(spread_line(cal.spread))
    left_out = [name for name, v in (("the solver's own costs", cal.overhead + cal.solve_fixed),
                                     ("opening, closing, loss", cal.ends),
                                     ("optimiser", cal.optimizer)) if not v]
    out(f"{N} layers, batch {config['data']['batch_size']}, up to {ranks} rank{'s' * (ranks != 1)}; modelled: "
        "the solves" + (f" (not included: {'; '.join(left_out)})" if left_out else ""))
    for line in report(predict(cal, config, ranks), ranks, cal.spread):
        out(line)
    return 0
