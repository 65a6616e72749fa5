/*
 * restrict.c -- residual, FAS restriction by injection, and coarse-grid
 * correction.
 *
 * For the C-point i = j*m of level l (coarse point j of level l+1), after
 * F-relaxation the residual lives at C-points only:
 *
 *     r_i = g_i + Phi(u_{i-1}) - u_i = w_i - u_i,
 *
 * where w_i comes from the fused final F-sweep (mg_Residual).  The coarse
 * problem is the FAS problem  A_c(v) = R(g - A(u)) + A_c(R u),  with R
 * injection, so
 *
 *     v_j = u_i,   g^c_j = w_i - Phi_c(u_{i-m}),
 *
 * and Phi_c(u_{i-m}) is one coarse step from the previous coarse point (a
 * sweep on level l+1 with every point a C-point; the previous coarse point
 * may be on the left neighbour).
 */
#include <math.h>
#include "mgrit_impl.h"

/* coarse range of level l+1 mapped to fine points of level l */
#define FINE(j) ((j) * (int64_t)f->cfactor - f->lo)

/*
 * The F-sweep that completes relaxation on level l, fused with the C-point
 * values w_i = Phi(u_{i-1}) [+ g_i] that the residual and the coarse
 * right-hand side need.  On level 0 (rnorm given) the local part of the
 * residual norm over the C-points i >= 1 is returned in *rnorm and the first
 * fine index with a non-finite residual in *bad (-1 if none).
 */
int mg_Residual(mg_Core core, int level, double *rnorm, int64_t *bad, int drop_w) {
  mg_Level *f = &core->levels[level];
  mg_Level *c = &core->levels[level + 1];
  drop_w = drop_w && rnorm;
  MG_CHK(mg_Sweep(core, level, f->cfactor, MG_SW_C | (drop_w ? MG_SW_NORM : 0)));
  if (!rnorm) return MG_OK;
  double acc = 0.0;
  *bad = -1;
  for (int64_t j = c->lo; j <= c->hi; j++) {
    if (j == 0) continue;
    double nr;
    if (drop_w) {
      nr = c->rn[j - c->lo]; /* measured in the sweep */
    } else {
      /* r_i = w_i - u_i */
      mg_Vector r = mg_CallClone(core, f->w[FINE(j)]);
      mg_CallSum(core, -1.0, f->u[FINE(j)], 1.0, r);
      nr = mg_CallNorm(core, r);
      mg_CallFree(core, &r);
    }
    if (!isfinite(nr)) {
      if (*bad < 0) *bad = j * c->stride;
      nr = INFINITY;
    }
    if (core->tnorm == MG_TNORM_INF) acc = nr > acc ? nr : acc;
    else acc += nr * nr;
  }
  *rnorm = core->tnorm == MG_TNORM_INF ? acc : sqrt(acc);
  return MG_OK;
}

/*
 * Level l -> l+1: v = R u.  With inject_only (the skipped first down-cycle)
 * the coarse problem is plain coarse time stepping, without a right-hand
 * side; otherwise g^c is formed from the w_i of the mg_Residual just done.
 */
int mg_Restrict(mg_Core core, int level, int inject_only) {
  mg_Level *f = &core->levels[level];
  mg_Level *c = &core->levels[level + 1];
  for (int64_t j = c->lo; j <= c->hi; j++) {
    int64_t k = j - c->lo;
    mg_Assign(core, &c->u[k], f->u[FINE(j)]);
    mg_CallFree(core, &c->g[k]);
  }
  if (inject_only) return MG_OK;

  /* g^c_j = w_i - Phi_c(v_{j-1}), formed in the sweep as soon as each
   * Phi_c(v_{j-1}) exists: one coarse work value at a time, not all */
  return mg_Sweep(core, level + 1, 1, MG_SW_C | MG_SW_NORHS | MG_SW_FAS);
}

/* C-points of level l take the coarse solution (injection's transpose). */
int mg_Correct(mg_Core core, int level) {
  mg_Level *f = &core->levels[level];
  mg_Level *c = &core->levels[level + 1];
  for (int64_t j = c->lo; j <= c->hi; j++) {
    if (j == 0) continue;
    int64_t k = j - c->lo;
    mg_CallFree(core, &f->u[FINE(j)]);
    f->u[FINE(j)] = c->u[k];
    c->u[k] = NULL;
  }
  return MG_OK;
}
