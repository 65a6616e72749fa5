/*
 * relax.c -- sweeps over one level: F- and C-relaxation, the coarsest-grid
 * solve and interpolation are all instances of mg_Sweep.
 *
 * A sweep with C-spacing m walks the segments that start at C-points (every
 * m-th point; m == 0 means only point 0, so the whole level is one sequential
 * segment; m == 1 means every point is a C-point and nothing is F).  Each
 * F-point j gets u_j = Phi(u_{j-1}) + g_j.  With MG_SW_C each C-point j >= 1
 * also gets a work value w_j = Phi(u_{j-1}) [+ g_j] from the F-point just
 * before it (or the C-point, when m == 1), computed from the values of this
 * same sweep, and with MG_SW_ASSIGN those values replace u_j once every
 * segment has read its start value: F then C relaxation, exactly as a
 * sequential sweep would do it.
 *
 * Across ranks, the first segment of a rank usually starts on the left
 * neighbour.  The left neighbour sends the value of its last point as this
 * sweep sees it (a C-point's value from before the sweep, an F-point's value
 * after its step); the right neighbour receives it as u_{lo-1}.  Each rank
 * first does the segment whose value its right neighbour waits for, then its
 * interior segments, and only then waits for its left neighbour, so the
 * results are those of the sequential sweep on any number of ranks.
 */
#include <stdlib.h>
#include "mgrit_impl.h"

typedef struct {
  mg_Core core;
  int level;
  mg_Level *lev;
  int64_t m;
  int flags;
} Sweep;

static int stored(const Sweep *s, int64_t j) {
  return s->level > 0 || mg_FineStored(s->core, j);
}

static mg_Vector rhs_of(const Sweep *s, int64_t j) {
  return s->lev->g[j - s->lev->lo]; /* NULL on level 0 and when absent */
}

/* is point j a C-point of this sweep? m == 0: only point 0 */
static int is_c(const Sweep *s, int64_t j) { return s->m == 0 ? j == 0 : j % s->m == 0; }

/*
 * Walk F-points first..last starting from the value *prev (owned by the walk
 * when *owned).  Stored points keep their new value; others live in the
 * walk's own vector, stepped in place.
 */
static void walk_f(const Sweep *s, int64_t first, int64_t last, mg_Vector *prev,
                   int *owned) {
  mg_Core core = s->core;
  mg_Level *lev = s->lev;
  for (int64_t j = first; j <= last; j++) {
    mg_Vector v = *owned ? *prev : mg_CallClone(core, *prev);
    mg_CallStep(core, s->level, j - 1, v, rhs_of(s, j));
    if (s->flags & MG_SW_ACCESS) mg_CallAccess(core, v, j * lev->stride, 1);
    if (stored(s, j)) {
      mg_CallFree(core, &lev->u[j - lev->lo]);
      lev->u[j - lev->lo] = v;
      *owned = 0;
    } else {
      *owned = 1;
    }
    *prev = v;
  }
}

/* The residual r_c = w_c - u_c of the C-point c, measured as soon as w_c
 * exists (the same operations mg_Residual would do after the sweep); w_c is
 * dropped then, except at the last point, whose w the end of a solve may
 * take. */
static void norm_now(const Sweep *s, int64_t c) {
  mg_Core core = s->core;
  mg_Level *lev = s->lev;
  mg_Level *cl = &core->levels[s->level + 1];
  mg_Vector *w = &lev->w[c - lev->lo];
  mg_Vector r;
  if (c == lev->n) {
    r = mg_CallClone(core, *w);
  } else {
    r = *w;
    *w = NULL;
  }
  mg_CallSum(core, -1.0, lev->u[c - lev->lo], 1.0, r);
  cl->rn[c / lev->cfactor - cl->lo] = mg_CallNorm(core, r);
  mg_CallFree(core, &r);
}

/* The FAS right-hand side of coarse point c, formed as soon as w_c =
 * Phi_c(v_{c-1}) exists (the operations mg_Restrict would do after the
 * sweep): g_c = w^f_i - w_c, i the fine C-point of c, whose w^f the residual
 * sweep of the level below left; both work values are dropped. */
static void fas_now(const Sweep *s, int64_t c) {
  mg_Core core = s->core;
  mg_Level *lev = s->lev;
  mg_Level *f = &core->levels[s->level - 1];
  int64_t k = c - lev->lo;
  mg_Vector *wf = &f->w[c * f->cfactor - f->lo];
  mg_CallFree(core, &lev->g[k]);
  lev->g[k] = *wf;
  *wf = NULL;
  mg_CallSum(core, -1.0, lev->w[k], 1.0, lev->g[k]);
  mg_CallFree(core, &lev->w[k]);
}

/* w_c <- Phi(prev) [+ g_c] for the C-point c that follows prev. */
static void c_value(const Sweep *s, int64_t c, mg_Vector *prev, int *owned) {
  mg_Core core = s->core;
  mg_Level *lev = s->lev;
  mg_Vector v = *owned ? *prev : mg_CallClone(core, *prev);
  *owned = 0;
  *prev = NULL;
  mg_Vector g = (s->flags & MG_SW_NORHS) ? NULL : rhs_of(s, c);
  mg_CallStep(core, s->level, c - 1, v, g);
  mg_CallFree(core, &lev->w[c - lev->lo]);
  lev->w[c - lev->lo] = v;
  if (s->flags & MG_SW_NORM) norm_now(s, c);
  if (s->flags & MG_SW_FAS) fas_now(s, c);
}

static void release(const Sweep *s, mg_Vector *prev, int *owned) {
  if (*owned) mg_CallFree(s->core, prev);
  *prev = NULL;
  *owned = 0;
}

/*
 * The segment that starts at the local C-point c: its F-points up to
 * min(c+m-1, hi) and, with MG_SW_C, the C-point c+m when it is local.
 * Returns the value at hi when the segment ends there (for the right
 * neighbour), else NULL; *owned_out tells whether the caller must free it.
 */
static mg_Vector segment(const Sweep *s, int64_t c, int *owned_out) {
  mg_Level *lev = s->lev;
  int64_t last_f = s->m == 0 ? lev->hi : c + s->m - 1;
  if (last_f > lev->hi) last_f = lev->hi;
  mg_Vector prev = lev->u[c - lev->lo];
  int owned = 0;
  if (s->flags & MG_SW_ACCESS) mg_CallAccess(s->core, prev, c * lev->stride, 1);
  walk_f(s, c + 1, last_f, &prev, &owned);
  int64_t next_c = s->m == 0 ? -1 : c + s->m;
  if ((s->flags & MG_SW_C) && next_c > 0 && next_c <= lev->hi) {
    c_value(s, next_c, &prev, &owned);
    return NULL;
  }
  if (last_f == lev->hi) {
    *owned_out = owned;
    return prev;
  }
  release(s, &prev, &owned);
  return NULL;
}

static int send_right(const Sweep *s, mg_Vector v) {
  return mg_SendVector(s->core, s->lev->right, s->level, v);
}

int mg_Sweep(mg_Core core, int level, int64_t m, int flags) {
  Sweep s = {core, level, &core->levels[level], m, flags};
  mg_Level *lev = s.lev;
  int64_t lo = lev->lo, hi = lev->hi;
  if (lo > hi) return MG_OK; /* this rank holds no point of this level */
  int with_c = (flags & MG_SW_C) != 0;

  /* Who needs what: the first point needs u_{lo-1} unless it is a C-point
   * that this sweep leaves alone; likewise for the right neighbour. */
  int need_left = lo > 0 && (!is_c(&s, lo) || with_c);
  int need_right = hi < lev->n && (!is_c(&s, hi + 1) || with_c);

  mg_Msg in = {0};
  if (need_left) MG_CHK(mg_PostRecv(core, lev->left, level, &in));

  /* local C-points c_first <= ... <= c_last (none if c_first > hi) */
  int64_t c_first, c_last;
  if (m == 0) {
    c_first = c_last = (lo == 0) ? 0 : hi + 1;
  } else {
    c_first = ((lo + m - 1) / m) * m;
    c_last = (hi / m) * m;
  }
  int have_c = c_first <= hi;

  /* A C-point's value before the sweep is what the right neighbour needs. */
  if (need_right && is_c(&s, hi)) MG_CHK(send_right(&s, lev->u[hi - lo]));

  /* The segment from the last local C-point first: it feeds the right. */
  if (have_c) {
    int owned = 0;
    mg_Vector end = segment(&s, c_last, &owned);
    if (need_right && !is_c(&s, hi)) MG_CHK(send_right(&s, end));
    if (owned) mg_CallFree(core, &end);
    for (int64_t c = c_first; c < c_last; c += m) {
      int o = 0;
      mg_Vector e = segment(&s, c, &o);
      if (o) mg_CallFree(core, &e);
    }
  }

  /* The leading segment, from the left neighbour's value. */
  if (need_left) {
    mg_Vector prev = NULL;
    MG_CHK(mg_FinishRecv(core, &in, &prev));
    int owned = 1;
    int64_t last_f = have_c ? c_first - 1 : hi;
    walk_f(&s, lo, last_f, &prev, &owned);
    if (have_c) {
      if (with_c && c_first >= 1) c_value(&s, c_first, &prev, &owned);
    } else if (need_right) {
      MG_CHK(send_right(&s, prev));
    }
    release(&s, &prev, &owned);
  }

  MG_CHK(mg_WaitSends(core));

  if (flags & MG_SW_ASSIGN) {
    for (int64_t c = c_first; have_c && c <= c_last; c += (m ? m : 1)) {
      if (c == 0) continue;
      mg_CallFree(core, &lev->u[c - lo]);
      lev->u[c - lo] = lev->w[c - lo];
      lev->w[c - lo] = NULL;
    }
  }
  return MG_OK;
}

/* Pre-smoothing: nrelax sweeps of F- then C-relaxation.  The F-sweep that
 * completes F(CF)^nrelax is fused with the residual in mg_Residual. */
int mg_Relax(mg_Core core, int level) {
  mg_Level *lev = &core->levels[level];
  for (int k = 0; k < lev->nrelax; k++)
    MG_CHK(mg_Sweep(core, level, lev->cfactor, MG_SW_C | MG_SW_ASSIGN));
  return MG_OK;
}
