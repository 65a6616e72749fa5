/*
 * drive.c -- the MGRIT iteration: V- and F-cycles over the hierarchy.
 *
 * One iteration on the fine level:
 *   relax F(CF)^nrelax  ->  residual  ->  stop test  ->  restriction
 *   -> coarse cycle on level 1 -> correct C-points.
 * The interpolation of the fine F-points from the corrected C-points is the
 * first F-sweep of the next iteration (its relaxation, or its residual
 * sweep), so it is not done separately.  The iteration at max_iter does not
 * relax: it only interpolates the last correction and measures r_max_iter,
 * in one sweep that is also the final sweep.  The coarse right-hand side is
 * formed only when another cycle follows.
 * The stop test follows the residual of the current state, so the history
 * holds iterations+1 norms: r_0 for the initial guess after relaxation, and
 * r_k after k cycles.  A hierarchy of one level is sequential time stepping
 * across ranks (exact, no residual).
 */
#include <math.h>
#include <stdlib.h>
#include "mgrit_impl.h"

static int record(mg_Core core, double rnorm) {
  if (core->nrnorms == core->caprnorms) {
    int cap = core->caprnorms ? 2 * core->caprnorms : 16;
    double *r = realloc(core->rnorms, (size_t)cap * sizeof(double));
    if (!r) return MG_ERR_MEMORY;
    core->rnorms = r;
    core->caprnorms = cap;
  }
  core->rnorms[core->nrnorms++] = rnorm;
  return MG_OK;
}

/*
 * Approximate solve of the level-l problem (l >= 1), shape V or F; with first
 * (the skipped first down-cycle) no relaxation and no coarse right-hand side.
 * With interp the F-points of level l are interpolated (F-relaxed from the
 * corrected C-points) at the end: the caller needs them when it corrects the
 * level below, whose C-points they are.  A caller that relaxes level l next
 * (the second cycle of an F-cycle) recomputes them from the C-points before
 * reading them, so it asks for no interpolation.
 */
static int cycle(mg_Core core, int l, int first, int shape, int interp) {
  if (l == core->nlevels - 1) return mg_Sweep(core, l, 0, 0);
  if (!first) {
    MG_CHK(mg_Relax(core, l));
    MG_CHK(mg_Residual(core, l, NULL, NULL, 0));
  }
  MG_CHK(mg_Restrict(core, l, first));
  int again = shape == MG_CYCLE_F && l + 1 < core->nlevels - 1;
  MG_CHK(cycle(core, l + 1, first, shape, !again));
  if (again) MG_CHK(cycle(core, l + 1, 0, MG_CYCLE_V, 1));
  MG_CHK(mg_Correct(core, l));
  return interp ? mg_Sweep(core, l, core->levels[l].cfactor, 0) : MG_OK;
}

/* Initial values on level 0: the initial condition always (it may have
 * changed since the last Drive), the other stored points unless the solve
 * starts warm from a kept solution (warm_now, agreed over the ranks) or
 * nothing reads them: a one-level solve overwrites them, and so does a cold
 * solve with the skipped first down-cycle (its coarsest solve steps from
 * point 0 alone, its corrections and interpolations write every other point
 * before any sweep reads it). */
static void initial_values(mg_Core core) {
  mg_Level *f = &core->levels[0];
  int only_first = core->nlevels == 1 || (core->skip && !core->warm_now);
  for (int64_t j = f->lo; j <= f->hi; j++) {
    mg_Vector *slot = &f->u[j - f->lo];
    if (j == 0) {
      mg_CallFree(core, slot);
      *slot = mg_CallInit(core, 0, 0);
    } else if (!only_first && mg_FineStored(core, j) && (!*slot || !core->warm_now)) {
      mg_CallFree(core, slot); /* a cold start from a kept solution: from init */
      *slot = mg_CallInit(core, 0, j);
    } else if (!mg_FineStored(core, j)) {
      mg_CallFree(core, slot); /* left over from other storage options */
    }
  }
}

static int final_access(mg_Core core) {
  mg_Level *f = &core->levels[0];
  if (core->store_all) {
    for (int64_t j = f->lo; j <= f->hi; j++)
      mg_CallAccess(core, f->u[j - f->lo], j, 1);
    return MG_OK;
  }
  /* F-points are not kept: one more F-sweep shows them (on one level the
   * whole sequential sweep once more) */
  return mg_Sweep(core, 0, core->nlevels == 1 ? 0 : f->cfactor, MG_SW_ACCESS);
}

/* Every fine step once more at the final state: F-points are recomputed
 * (to the same values) and the C-point steps' results are dropped. */
static int final_sweep(mg_Core core) {
  mg_Level *f = &core->levels[0];
  core->in_final = 1;
  int rc = mg_Sweep(core, 0, f->cfactor, MG_SW_C);
  core->in_final = 0;
  for (int64_t j = f->lo; j <= f->hi; j++) mg_CallFree(core, &f->w[j - f->lo]);
  return rc;
}

/*
 * NaN or Inf in points that no residual sees: the F-points after the last
 * C-point (which F-relaxation sets from it), or any point of a one-level
 * solve.  NaN and Inf propagate forward, so each rank measures its last
 * stored point and only then looks for the first bad one.  -1: none.
 */
static int64_t unchecked_nonfinite(mg_Core core) {
  mg_Level *f = &core->levels[0];
  if (core->failed || f->lo > f->hi) return -1;
  int64_t from = f->lo;
  if (core->nlevels > 1) {
    int64_t last_c = (f->n / f->cfactor) * f->cfactor;
    if (f->hi <= last_c) return -1;
    if (last_c + 1 > from) from = last_c + 1;
  }
  int64_t j = f->hi;
  while (j >= from && !f->u[j - f->lo]) j--;
  if (j < from || isfinite(mg_CallNorm(core, f->u[j - f->lo]))) return -1;
  for (int64_t i = from; i <= j; i++) {
    mg_Vector u = f->u[i - f->lo];
    if (u && !isfinite(mg_CallNorm(core, u))) return i;
  }
  return j;
}

/* A tolerance of 0 is no test at all: with both 0 the solve runs max_iter
 * iterations, even through an exactly zero residual. */
static int converged(mg_Core core, double rnorm) {
  if (core->atol > 0 && rnorm <= core->atol) return 1;
  return core->rtol > 0 && rnorm <= core->rtol * core->rnorms[0];
}

/*
 * When the solve stops: a last fine point that is a C-point takes w_n, the
 * step from u_{n-1} that the residual sweep just took, in place of its
 * coarse-corrected value, so that the returned states end with an ordinary
 * step from the last F-point (the one the final sweep's user work saw).
 * The residual history is unchanged; the other work values are dropped.
 */
static void take_last_step(mg_Core core) {
  mg_Level *f = &core->levels[0];
  for (int64_t j = f->lo; j <= f->hi; j++) {
    mg_Vector *w = &f->w[j - f->lo];
    if (j == f->n && *w && !core->failed) {
      mg_CallFree(core, &f->u[j - f->lo]);
      f->u[j - f->lo] = *w;
      *w = NULL;
    }
    mg_CallFree(core, w);
  }
}

static int iterate(mg_Core core) {
  int warm = core->warm_now;
  for (core->iter = 0;; core->iter++) {
    int first = core->iter == 0 && core->skip && !warm;
    if (!first) {
      double local = 0.0, rnorm = 0.0;
      int64_t bad = -1;
      /* At max_iter this iteration is the last whatever its residual: it
       * only completes the interpolation of the last correction (its
       * F-sweep) and measures the residual; that sweep (every fine step
       * once, at the state the solve returns) serves as the final sweep. */
      int last = core->iter >= core->max_iter;
      if (!last) MG_CHK(mg_Relax(core, 0));
      else mg_FreeCoarse(core); /* no cycle follows: the final sweep runs without them */
      core->in_final = core->final_sweep && last;
      /* the last sweep measures each residual as it goes and drops the
       * work values at once: no restriction reads them */
      int rc = mg_Residual(core, 0, &local, &bad, last);
      core->final_done = core->in_final;
      core->in_final = 0;
      MG_CHK(rc);
      MG_CHK(mg_AgreeNorm(core, local, bad, &rnorm, &core->nonfinite));
      if (core->failed) return MG_OK;
      MG_CHK(record(core, rnorm));
      if (core->nonfinite >= 0) return MG_OK;
      if (converged(core, rnorm) || last) {
        take_last_step(core);
        return MG_OK;
      }
    }
    MG_CHK(mg_Restrict(core, 0, first));
    int again = core->cycle == MG_CYCLE_F && core->nlevels > 2;
    MG_CHK(cycle(core, 1, first, core->cycle, !again));
    if (again) MG_CHK(cycle(core, 1, 0, MG_CYCLE_V, 1));
    /* The corrected C-points only: the next iteration begins with an
     * F-sweep from them (relaxation, or the residual sweep), which is the
     * interpolation; no fine F-point is read before it. */
    MG_CHK(mg_Correct(core, 0));
  }
}

/* The agreements before the first message: [value, (P - rank) * 16 + error
 * code of a rank that failed so far, or 0, flag], maximised; the maximum
 * names the lowest failing rank.  Returns MG_OK, or the failure
 * (MG_ERR_REMOTE where it happened elsewhere). */
static int agree_start(mg_Core core, uint64_t value, uint64_t *max_value,
                       uint64_t flag, uint64_t *max_flag) {
  uint64_t mine[3] = {value, 0, flag}, most[3] = {0, 0, 0};
  if (core->failed)
    mine[1] = (uint64_t)(core->size - core->rank) * 16 + (uint64_t)core->failed;
  MG_CHK(mg_Allreduce(core, mine, most, 3, MPI_UINT64_T, MPI_MAX));
  if (most[1]) {
    core->fail_rank = core->size - (int)(most[1] / 16);
    core->fail_code = (int)(most[1] % 16);
    if (!core->failed) core->failed = MG_ERR_REMOTE;
    core->rbufcap = 0; /* ranks that grew their buffer forget it, as the others */
    return core->failed;
  }
  if (max_value) *max_value = most[0];
  if (max_flag) *max_flag = most[2];
  return MG_OK;
}

/* Whether this rank can start warm: it holds a solution, or it keeps no
 * point (store C: a block without a C-point, or the middle of a one-level
 * solve), so that nothing is missing here.  A solution installed point by
 * point (mg_SetVector) reaches only the ranks that keep points. */
static int ready_warm(mg_Core core) {
  if (core->have_solution) return 1;
  const mg_Level *f = &core->levels[0];
  for (int64_t j = f->lo; j <= f->hi; j++)
    if (mg_FineStored(core, j)) return 0;
  return 1;
}

/*
 * Everything a Drive allocates up front (levels, the receive buffer, room for
 * the residual history), and the first agreement: the message size, and
 * whether every rank got this far.  A failure here on one rank (memory, the
 * bufsize callback) is known to all before any message is sent.
 */
static int start(mg_Core core) {
  int rc = mg_BuildHierarchy(core);
  size_t bytes = 0;
  if (rc == MG_OK) mg_CallBufSize(core, &bytes);
  int need = core->max_iter + 2;
  if (rc == MG_OK && core->caprnorms < need) {
    double *r = realloc(core->rnorms, (size_t)need * sizeof(double));
    if (r) {
      core->rnorms = r;
      core->caprnorms = need;
    } else {
      rc = MG_ERR_MEMORY;
    }
  }
  if (rc != MG_OK) mg_FailLocal(core, rc);
  /* Every rank sizes its receive buffer alike: ranks that report different
   * upper bounds all use the largest.  And all start warm or all cold (a
   * rank not ready makes every rank start cold). */
  uint64_t most = 0, cold = 0;
  int ready = rc == MG_OK && ready_warm(core);
  MG_CHK(agree_start(core, bytes, &most, (uint64_t)!ready, &cold));
  core->warm_now = !cold;
  core->bufsize = (size_t)most;
  core->msgsize = 2 * sizeof(double) + core->bufsize;
  /* The receive buffer grows to the agreed size: msgsize and rbufcap are
   * the same on every rank, so either all ranks take part in this agreement
   * or none. */
  if (core->msgsize <= core->rbufcap) return MG_OK;
  mg_EnsureRecvBuffer(core); /* a failure is recorded, and agreed here: */
  return agree_start(core, 0, NULL, 0, NULL);
}

int mg_Drive(mg_Core core) {
  if (!core) return MG_ERR_ARG;
  if (core->broken) return MG_ERR_STATE;
  double t_begin = MPI_Wtime();
  for (int l = 0; l < MG_MAX_LEVELS; l++) core->stats.steps[l] = 0;
  core->stats.calls = core->stats.messages = core->stats.bytes = 0;
  core->stats.buffers = 0;
  core->stats.callback_time = 0.0;
  core->clock = 0.0;
  core->failed = 0;
  core->fail_code = 0;
  core->fail_rank = -1;
  core->fail_index = -1;
  core->nonfinite = -1;
  core->nrnorms = 0;
  core->iter = 0;
  core->final_done = 0;

  int rc = start(core);
  if (rc != MG_OK) {
    core->have_solution = 0;
    return rc;
  }
  initial_values(core);

  if (core->nlevels == 1) {
    core->in_final = 1; /* sequential stepping: the one sweep is final */
    MG_CHK(mg_Sweep(core, 0, 0, 0));
    core->in_final = 0;
    core->iter = 1;
  } else {
    MG_CHK(iterate(core));
    mg_FreeCoarse(core); /* read no more: not held during a final sweep */
  }
  {
    int64_t bad = unchecked_nonfinite(core), bad_global = -1;
    MG_CHK(mg_AgreeNorm(core, -1.0, bad, NULL, &bad_global));
    if (bad_global >= 0 && (core->nonfinite < 0 || bad_global < core->nonfinite))
      core->nonfinite = bad_global;
  }
  if (!core->failed && core->nonfinite < 0) {
    /* user work after the last agreement: one more agreement covers it (a
     * failure in the final sweep turns access into no-ops and poisoned
     * messages, as everywhere) */
    int sweep = core->final_sweep && core->nlevels > 1 && !core->final_done;
    if (sweep) MG_CHK(final_sweep(core));
    if (core->ops.access) MG_CHK(final_access(core));
    if (sweep || core->ops.access) MG_CHK(mg_AgreeFailure(core));
  }

  core->have_solution = !core->failed && core->nonfinite < 0;
  /* Nothing reads the coarse levels, the right-hand sides or the work
   * values after a solve (the next Drive rebuilds them from the fine
   * solution): only the stored fine points stay held between solves. */
  mg_FreeHierarchy(core, 1);
  core->stats.iterations = core->iter;
  core->stats.nlevels = core->nlevels;
  core->stats.virtual_time = core->clock;
  core->stats.total_time = MPI_Wtime() - t_begin;
  if (core->failed) return core->failed;
  if (core->nonfinite >= 0) return MG_ERR_NONFINITE;
  return MG_OK;
}
