/*
 * hierarchy.c -- the distribution of grid points over ranks and the grid
 * hierarchy.
 *
 * Fine points 1..N are split into P contiguous blocks of nearly equal size,
 * one per rank in time order; point 0 (the initial condition) goes with the
 * first block.  So the rank that owns point i+1 owns the step i -> i+1, and
 * every rank owns at least one step when P <= N.  A reversed solve (an
 * adjoint, run backward in time) mirrors that layout: its point a is the
 * forward point N-a, and it lives on the rank that owns the forward step
 * into N+1-a, so that step a-1 -> a of the reversed solve and forward step
 * N-a -> N+1-a are on the same rank.
 *
 * The hierarchy (mg_Hierarchy, the one computation of it: the binding hands
 * it to Python as braid_ext.hierarchy) coarsens level l by its cfactor while
 * the coarse grid keeps min_coarse steps and fewer than max_levels levels
 * are built.  A coarse point j of level l is the fine point j*stride_l and
 * belongs to the rank that owns that fine point; a rank may own no point on
 * a coarse level.
 */
#include <stdlib.h>
#include "mgrit_impl.h"

/* first fine point of the block of time-ordered rank q (forward layout) */
static int64_t fwd_lo(int64_t N, int P, int q) {
  return q == 0 ? 0 : 1 + (int64_t)((__int128)q * N / P);
}

static int64_t fwd_hi(int64_t N, int P, int q) {
  return (int64_t)((__int128)(q + 1) * N / P);
}

int mg_BlockRange(int64_t N, int P, int q, int64_t *lo, int64_t *hi) {
  if (N < 1 || P < 1 || P > N || q < 0 || q >= P || !lo || !hi) return MG_ERR_ARG;
  *lo = fwd_lo(N, P, q);
  *hi = fwd_hi(N, P, q);
  return MG_OK;
}

int mg_Hierarchy(int64_t nsteps, int max_levels, int64_t min_coarse, const int *cfactor,
                 int ncfactor, int *nlevels, int64_t *n, int64_t *stride) {
  if (nsteps < 1 || max_levels < 1 || max_levels > MG_MAX_LEVELS || min_coarse < 1 ||
      !cfactor || ncfactor < 1 || ncfactor > MG_MAX_LEVELS || !nlevels || !n || !stride)
    return MG_ERR_ARG;
  for (int l = 0; l < ncfactor; l++)
    if (cfactor[l] < 2) return MG_ERR_ARG;
  int L = 0;
  n[0] = nsteps;
  stride[0] = 1;
  for (;;) {
    int cf = cfactor[L < ncfactor ? L : ncfactor - 1];
    int coarsen = L + 1 < max_levels && n[L] / cf >= min_coarse;
    L++;
    if (!coarsen) break;
    n[L] = n[L - 1] / cf;
    stride[L] = stride[L - 1] * cf;
  }
  *nlevels = L;
  return MG_OK;
}

int mg_LayerOwner(int64_t N, int P, int64_t n, int *owner) {
  if (N < 1 || P < 1 || P > N || n < 0 || n >= N || !owner) return MG_ERR_ARG;
  int a = 0, b = P - 1; /* largest q whose block starts at or before point n+1 */
  while (a < b) {
    int mid = a + (b - a + 1) / 2;
    if (fwd_lo(N, P, mid) <= n + 1) a = mid;
    else b = mid - 1;
  }
  *owner = a;
  return MG_OK;
}

/* first fine point of time-ordered rank q in the current layout: the
 * forward block, or in a reversed solve the mirror of forward rank P-1-q */
static int64_t block_lo(mg_Core core, int q) {
  int64_t N = core->nsteps, lo, hi;
  int P = core->size;
  if (!core->reverse) {
    mg_BlockRange(N, P, q, &lo, &hi);
    return lo;
  }
  if (q == 0) return 0;
  mg_BlockRange(N, P, P - 1 - q, &lo, &hi);
  return N + 1 - hi;
}

static int64_t block_hi(mg_Core core, int q) {
  int64_t N = core->nsteps, lo, hi;
  int P = core->size;
  if (!core->reverse) {
    mg_BlockRange(N, P, q, &lo, &hi);
    return hi;
  }
  mg_BlockRange(N, P, P - 1 - q, &lo, &hi);
  return N + 1 - (lo > 1 ? lo : 1);
}

static int time_rank(mg_Core core, int rank) {
  return core->reverse ? core->size - 1 - rank : rank;
}

static int comm_rank(mg_Core core, int q) {
  return core->reverse ? core->size - 1 - q : q;
}

/* communicator rank owning fine point i */
static int owner_fine(mg_Core core, int64_t i) {
  int a = 0, b = core->size - 1; /* largest q with block_lo(q) <= i */
  while (a < b) {
    int mid = (a + b + 1) / 2;
    if (block_lo(core, mid) <= i) a = mid;
    else b = mid - 1;
  }
  return comm_rank(core, a);
}

int mg_Owner(mg_Core core, int level, int64_t j) {
  return owner_fine(core, j * core->levels[level].stride);
}

/* is fine point j kept between sweeps?  Without store_all: the C-points and
 * the last point; a one-level solve (whose only C-point is 0) keeps its two
 * end points, stepping the others in place.  A rank may then keep no point
 * (see the agreement on warm starts in drive.c). */
int mg_FineStored(mg_Core core, int64_t j) {
  const mg_Level *f = &core->levels[0];
  if (core->store_all) return 1;
  if (core->nlevels == 1) return j == 0 || j == f->n;
  return j % f->cfactor == 0 || j == f->n;
}

static void free_vectors(mg_Core core, mg_Vector *v, int64_t n) {
  if (!v) return;
  for (int64_t k = 0; k < n; k++) mg_CallFree(core, &v[k]);
}

/* Free the vectors of the coarse levels (the arrays stay): once no coarse
 * cycle follows, nothing reads them. */
void mg_FreeCoarse(mg_Core core) {
  for (int l = 1; l < core->nlevels; l++) {
    mg_Level *lev = &core->levels[l];
    int64_t n = lev->hi >= lev->lo ? lev->hi - lev->lo + 1 : 0;
    free_vectors(core, lev->u, n);
    free_vectors(core, lev->g, n);
    free_vectors(core, lev->w, n);
  }
}

/* Free the hierarchy; with keep_fine the level-0 solution is kept. */
void mg_FreeHierarchy(mg_Core core, int keep_fine) {
  for (int l = 0; l < core->nlevels; l++) {
    mg_Level *lev = &core->levels[l];
    int64_t n = lev->hi >= lev->lo ? lev->hi - lev->lo + 1 : 0;
    if (!(keep_fine && l == 0)) {
      free_vectors(core, lev->u, n);
      free(lev->u);
      lev->u = NULL;
    }
    free_vectors(core, lev->g, n);
    free_vectors(core, lev->w, n);
    free(lev->g);
    free(lev->w);
    free(lev->rn);
    lev->g = lev->w = NULL;
    lev->rn = NULL;
  }
  if (!keep_fine) core->nlevels = 0;
}

/* Build the levels for the current options.  The level-0 solution survives
 * when the layout is unchanged (warm start). */
int mg_BuildHierarchy(mg_Core core) {
  int keep = core->have_solution && core->warm && core->nlevels > 0 &&
             core->built_reverse == core->reverse;
  mg_Vector *fine_u = keep ? core->levels[0].u : NULL;
  if (keep) core->levels[0].u = NULL;
  mg_FreeHierarchy(core, 0);
  if (!keep) core->have_solution = 0;

  int q = time_rank(core, core->rank);
  int64_t flo = block_lo(core, q), fhi = block_hi(core, q);
  int64_t n[MG_MAX_LEVELS], stride[MG_MAX_LEVELS];
  int L = 0;
  MG_CHK(mg_Hierarchy(core->nsteps, core->max_levels, core->min_coarse, core->cfactor,
                      MG_MAX_LEVELS, &L, n, stride));
  for (int l = 0; l < L; l++) {
    mg_Level *lev = &core->levels[l];
    lev->n = n[l];
    lev->stride = stride[l];
    lev->nrelax = core->nrelax[l];
    lev->lo = (flo + stride[l] - 1) / stride[l];
    lev->hi = fhi / stride[l];
    lev->cfactor = l + 1 < L ? core->cfactor[l] : 0;
  }
  core->nlevels = L;
  core->built_reverse = core->reverse;

  for (int l = 0; l < L; l++) {
    mg_Level *lev = &core->levels[l];
    int64_t cnt = lev->hi >= lev->lo ? lev->hi - lev->lo + 1 : 0;
    lev->left = (cnt > 0 && lev->lo > 0) ? mg_Owner(core, l, lev->lo - 1) : -1;
    lev->right = (cnt > 0 && lev->hi < lev->n) ? mg_Owner(core, l, lev->hi + 1) : -1;
    size_t bytes = (size_t)(cnt > 0 ? cnt : 1) * sizeof(mg_Vector);
    lev->u = (l == 0 && fine_u) ? fine_u : calloc(1, bytes);
    lev->g = calloc(1, bytes);
    lev->w = calloc(1, bytes);
    lev->rn = calloc((size_t)(cnt > 0 ? cnt : 1), sizeof(double));
    if (!lev->u || !lev->g || !lev->w || !lev->rn) return MG_ERR_MEMORY;
  }
  return MG_OK;
}
