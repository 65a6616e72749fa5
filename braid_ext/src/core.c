/*
 * core.c -- solver lifecycle, options and results.
 */
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "mgrit_impl.h"

#if defined(OPEN_MPI) && OPEN_MPI
#include <mpi-ext.h>
#endif

int mg_MPICudaSupport(void) {
#if defined(MPICH) && defined(MPI_VERSION) && MPI_VERSION >= 4
  return MPIX_Query_cuda_support();
#elif defined(MPIX_CUDA_AWARE_SUPPORT) && MPIX_CUDA_AWARE_SUPPORT
  return MPIX_Query_cuda_support();
#else
  return 0;
#endif
}

const char *mg_ErrorString(int code) {
  switch (code) {
    case MG_OK: return "no error";
    case MG_ERR_ARG: return "invalid argument";
    case MG_ERR_MEMORY: return "out of memory";
    case MG_ERR_MPI: return "MPI call failed";
    case MG_ERR_CALLBACK: return "a user callback failed on this rank";
    case MG_ERR_REMOTE: return "the solve failed on another rank";
    case MG_ERR_NONFINITE: return "the MGRIT residual is not finite (NaN or Inf)";
    case MG_ERR_STATE: return "call not valid in this state";
    case MG_ERR_TIMEOUT: return "a rank did not answer within the timeout";
    default: return "unknown error";
  }
}

int mg_Init(MPI_Comm comm, double t_start, double t_stop, int64_t nsteps,
            mg_App app, const mg_Ops *ops, mg_Core *core_out) {
  if (!core_out) return MG_ERR_ARG;
  *core_out = NULL;
  if (nsteps < 1 || !ops || !ops->step || !ops->init || !ops->clone ||
      !ops->free || !ops->sum || !ops->norm || !ops->bufsize ||
      !ops->bufpack || !ops->bufunpack || !ops->bufalloc != !ops->buffree ||
      !isfinite(t_start) ||
      !isfinite(t_stop) || t_start == t_stop)
    return MG_ERR_ARG;
  int size;
  if (MPI_Comm_size(comm, &size) != MPI_SUCCESS) return MG_ERR_MPI;
  if (size > nsteps) return MG_ERR_ARG;

  mg_Core core = calloc(1, sizeof(*core));
  if (!core) return MG_ERR_MEMORY;
  if (MPI_Comm_dup(comm, &core->comm) != MPI_SUCCESS) {
    free(core);
    return MG_ERR_MPI;
  }
  /* access (optional) is called in sweeps with messages: all ranks or none */
  int has[2] = {ops->access != NULL, ops->access == NULL}, any[2];
  if (MPI_Allreduce(has, any, 2, MPI_INT, MPI_MAX, core->comm) != MPI_SUCCESS ||
      (any[0] && any[1])) {
    int mismatch = any[0] && any[1];
    MPI_Comm_free(&core->comm);
    free(core);
    return mismatch ? MG_ERR_ARG : MG_ERR_MPI;
  }
  MPI_Comm_rank(core->comm, &core->rank);
  core->size = size;
  core->t0 = t_start;
  core->t1 = t_stop;
  core->nsteps = nsteps;
  core->app = app;
  core->ops = *ops;
  core->app_buffers = ops->bufalloc != NULL;
  core->max_count = INT_MAX;
  core->bigtype = MPI_DATATYPE_NULL;
  core->wait = MG_WAIT_BUSY;

  core->max_levels = 2;
  core->min_coarse = 2;
  for (int l = 0; l < MG_MAX_LEVELS; l++) {
    core->cfactor[l] = 2;
    core->nrelax[l] = 1;
    core->step_cost[l] = 1.0;
  }
  core->cycle = MG_CYCLE_V;
  core->max_iter = 100;
  core->atol = 1e-10;
  core->warm = 1;
  core->fail_rank = -1;
  core->fail_index = -1;
  core->nonfinite = -1;
  *core_out = core;
  return MG_OK;
}

int mg_Destroy(mg_Core *core_ptr) {
  if (!core_ptr || !*core_ptr) return MG_OK;
  mg_Core core = *core_ptr;
  core->failed = 0; /* frees go through even after a failed Drive */
  mg_FreeHierarchy(core, 0);
  mg_WaitSends(core);
  free(core->sends);
  free(core->rnorms);
  mg_FreeBuffers(core);
  /* after a timeout, requests may still refer to the communicator: it is
   * left to MPI (freeing it could wait for ranks that do not answer) */
  if (!core->broken) MPI_Comm_free(&core->comm);
  free(core);
  *core_ptr = NULL;
  return MG_OK;
}

/* ---- options ----------------------------------------------------------- */

#define NEED(cond) do { if (!core || !(cond)) return MG_ERR_ARG; } while (0)
#define LEVEL_OK(level) ((level) >= -1 && (level) < MG_MAX_LEVELS)

int mg_SetMaxLevels(mg_Core core, int v) {
  NEED(v >= 1 && v <= MG_MAX_LEVELS);
  core->max_levels = v;
  return MG_OK;
}

int mg_SetMinCoarse(mg_Core core, int64_t v) {
  NEED(v >= 1);
  core->min_coarse = v;
  return MG_OK;
}

int mg_SetCFactor(mg_Core core, int level, int v) {
  NEED(LEVEL_OK(level) && v >= 2);
  for (int l = 0; l < MG_MAX_LEVELS; l++)
    if (level == -1 || l == level) core->cfactor[l] = v;
  return MG_OK;
}

int mg_SetNRelax(mg_Core core, int level, int v) {
  NEED(LEVEL_OK(level) && v >= 0);
  for (int l = 0; l < MG_MAX_LEVELS; l++)
    if (level == -1 || l == level) core->nrelax[l] = v;
  return MG_OK;
}

int mg_SetStepCost(mg_Core core, int level, double v) {
  NEED(LEVEL_OK(level) && v >= 0 && isfinite(v));
  for (int l = 0; l < MG_MAX_LEVELS; l++)
    if (level == -1 || l == level) core->step_cost[l] = v;
  return MG_OK;
}

int mg_SetCycle(mg_Core core, int v) {
  NEED(v == MG_CYCLE_V || v == MG_CYCLE_F);
  core->cycle = v;
  return MG_OK;
}

int mg_SetSkip(mg_Core core, int v) { NEED(v == 0 || v == 1); core->skip = v; return MG_OK; }
int mg_SetAbsTol(mg_Core core, double v) { NEED(v >= 0 && isfinite(v)); core->atol = v; return MG_OK; }
int mg_SetRelTol(mg_Core core, double v) { NEED(v >= 0 && isfinite(v)); core->rtol = v; return MG_OK; }
int mg_SetMaxIter(mg_Core core, int v) { NEED(v >= 1); core->max_iter = v; return MG_OK; }
int mg_SetTemporalNorm(mg_Core core, int v) {
  NEED(v == MG_TNORM_L2 || v == MG_TNORM_INF);
  core->tnorm = v;
  return MG_OK;
}
int mg_SetStoreAll(mg_Core core, int v) { NEED(v == 0 || v == 1); core->store_all = v; return MG_OK; }
int mg_SetReverse(mg_Core core, int v) { NEED(v == 0 || v == 1); core->reverse = v; return MG_OK; }
int mg_SetWarmStart(mg_Core core, int v) {
  NEED(v == 0 || v == 1);
  core->warm = v;
  return MG_OK;
}
int mg_SetFinalSweep(mg_Core core, int v) {
  NEED(v == 0 || v == 1);
  core->final_sweep = v;
  return MG_OK;
}

int mg_SetTimeout(mg_Core core, double v) {
  NEED(v >= 0 && isfinite(v));
  core->timeout = v;
  return MG_OK;
}

int mg_SetWait(mg_Core core, int v) {
  NEED(v == MG_WAIT_BUSY || v == MG_WAIT_SLEEP);
  core->wait = v;
  return MG_OK;
}

int mg_SetMaxCount(mg_Core core, int64_t v) {
  NEED(v >= 1 && v <= INT_MAX);
  core->max_count = v;
  return MG_OK;
}

int mg_SetLatency(mg_Core core, double v) {
  NEED(v >= 0 && isfinite(v));
  core->latency = v;
  return MG_OK;
}

/* ---- results ----------------------------------------------------------- */

int mg_GetNumIter(mg_Core core, int *out) { NEED(out); *out = core->stats.iterations; return MG_OK; }
/* Before the first Drive the levels are built from the options so far (no
 * callback is needed for that); Drive rebuilds them from its options. */
static int ensure_levels(mg_Core core) {
  return core->nlevels > 0 ? MG_OK : mg_BuildHierarchy(core);
}

int mg_GetNumLevels(mg_Core core, int *out) {
  NEED(out);
  MG_CHK(ensure_levels(core));
  *out = core->nlevels;
  return MG_OK;
}
int mg_GetRank(mg_Core core, int *out) { NEED(out); *out = core->rank; return MG_OK; }

int mg_GetResidualNorms(mg_Core core, double *norms, int max, int *n_out) {
  NEED(n_out && max >= 0 && (norms || max == 0));
  for (int k = 0; k < core->nrnorms && k < max; k++) norms[k] = core->rnorms[k];
  *n_out = core->nrnorms;
  return MG_OK;
}

int mg_GetLocalRange(mg_Core core, int level, int64_t *lo, int64_t *hi) {
  NEED(lo && hi);
  MG_CHK(ensure_levels(core));
  NEED(level >= 0 && level < core->nlevels);
  *lo = core->levels[level].lo;
  *hi = core->levels[level].hi;
  return MG_OK;
}

int mg_GetLevelSize(mg_Core core, int level, int64_t *n, int64_t *stride) {
  NEED(n && stride);
  MG_CHK(ensure_levels(core));
  NEED(level >= 0 && level < core->nlevels);
  *n = core->levels[level].n;
  *stride = core->levels[level].stride;
  return MG_OK;
}

int mg_IsStored(mg_Core core, int64_t index, int *out) {
  NEED(out && core->nlevels > 0);
  const mg_Level *f = &core->levels[0];
  NEED(index >= f->lo && index <= f->hi);
  *out = mg_FineStored(core, index) && f->u[index - f->lo] != NULL;
  return MG_OK;
}

int mg_GetVector(mg_Core core, int64_t index, mg_Vector *out) {
  int stored = 0;
  MG_CHK(mg_IsStored(core, index, &stored));
  if (!stored || !core->have_solution) return MG_ERR_STATE;
  *out = core->levels[0].u[index - core->levels[0].lo];
  return MG_OK;
}

int mg_SetVector(mg_Core core, int64_t index, mg_Vector u) {
  NEED(u && !core->broken);
  if (core->nlevels == 0) MG_CHK(mg_BuildHierarchy(core));
  mg_Level *f = &core->levels[0];
  NEED(index >= f->lo && index <= f->hi && mg_FineStored(core, index));
  mg_CallFree(core, &f->u[index - f->lo]);
  f->u[index - f->lo] = u;
  /* a solution once every stored point owned here holds a vector */
  int all = 1;
  for (int64_t j = f->lo; j <= f->hi; j++)
    if (mg_FineStored(core, j) && !f->u[j - f->lo]) all = 0;
  core->have_solution = all;
  return MG_OK;
}

int mg_GetFailure(mg_Core core, int *rank_out, int64_t *index_out) {
  NEED(rank_out && index_out);
  *rank_out = core->fail_rank;
  *index_out = core->nonfinite >= 0 ? core->nonfinite : core->fail_index;
  return MG_OK;
}

int mg_GetFailureCode(mg_Core core, int *out) {
  NEED(out);
  *out = core->fail_code;
  return MG_OK;
}

int mg_GetStats(mg_Core core, int reduce, mg_Stats *out) {
  NEED(out && (reduce == 0 || reduce == 1));
  *out = core->stats;
  if (!reduce) return MG_OK;
  /* counts add up over ranks; times and the clock take the maximum */
  int64_t cnt[MG_MAX_LEVELS + 4], gcnt[MG_MAX_LEVELS + 4];
  for (int l = 0; l < MG_MAX_LEVELS; l++) cnt[l] = out->steps[l];
  cnt[MG_MAX_LEVELS] = out->calls;
  cnt[MG_MAX_LEVELS + 1] = out->messages;
  cnt[MG_MAX_LEVELS + 2] = out->bytes;
  cnt[MG_MAX_LEVELS + 3] = out->buffers;
  double tm[3] = {out->callback_time, out->total_time, out->virtual_time}, gtm[3];
  if (core->broken) return MG_ERR_STATE;
  MG_CHK(mg_Allreduce(core, cnt, gcnt, MG_MAX_LEVELS + 4, MPI_INT64_T, MPI_SUM));
  MG_CHK(mg_Allreduce(core, tm, gtm, 3, MPI_DOUBLE, MPI_MAX));
  for (int l = 0; l < MG_MAX_LEVELS; l++) out->steps[l] = gcnt[l];
  out->calls = gcnt[MG_MAX_LEVELS];
  out->messages = gcnt[MG_MAX_LEVELS + 1];
  out->bytes = gcnt[MG_MAX_LEVELS + 2];
  out->buffers = gcnt[MG_MAX_LEVELS + 3];
  out->callback_time = gtm[0];
  out->total_time = gtm[1];
  out->virtual_time = gtm[2];
  return MG_OK;
}

/* ---- self-test of an application --------------------------------------- */

#define CHECK(cond, ...)                                                      \
  do {                                                                        \
    if (!(cond)) {                                                            \
      snprintf(msg, msglen, __VA_ARGS__);                                     \
      rc = MG_ERR_CALLBACK;                                                   \
      goto done;                                                              \
    }                                                                         \
  } while (0)

int mg_CheckApp(mg_App app, const mg_Ops *ops, double t, char *msg, size_t msglen) {
  if (!ops || !msg || msglen == 0) return MG_ERR_ARG;
  msg[0] = '\0';
  int rc = MG_OK;
  mg_Vector u = NULL, v = NULL, w = NULL;
  char *buf = NULL;
  void *handle = NULL;
  int owned = 0;
  double nu = 0, nv = 0, nd = 0;
  size_t size = 0;
  CHECK(ops->init(app, t, 0, &u) == 0 && u, "init(t) failed or gave no vector");
  CHECK(ops->clone(app, u, &v) == 0 && v, "clone failed or gave no vector");
  CHECK(ops->norm(app, u, &nu) == 0 && ops->norm(app, v, &nv) == 0, "norm failed");
  CHECK(isfinite(nu) && nu >= 0, "norm(u) = %g is not a finite non-negative number", nu);
  CHECK(nu == nv, "norm(clone(u)) = %.17g differs from norm(u) = %.17g", nv, nu);
  /* v <- 2u - v = u, then v <- v - u = 0 */
  CHECK(ops->sum(app, 2.0, u, -1.0, v) == 0, "sum failed");
  CHECK(ops->sum(app, -1.0, u, 1.0, v) == 0, "sum failed");
  CHECK(ops->norm(app, v, &nd) == 0, "norm failed");
  CHECK(nd <= 1e-12 * (nu > 1 ? nu : 1), "sum: norm(2u - u - u) = %g is not zero", nd);
  /* the sums changed the clone only: u must be as it was */
  CHECK(ops->norm(app, u, &nv) == 0, "norm failed");
  CHECK(nv == nu, "clone(u) is not independent of u: changing the clone changed "
        "norm(u) from %.17g to %.17g; clone must return a copy", nu, nv);
  CHECK(ops->bufsize(app, &size) == 0, "bufsize failed");
  if (ops->bufalloc) {
    CHECK(!ops->buffree == !ops->bufalloc, "bufalloc is given without buffree");
    CHECK(ops->bufalloc(app, size, (void **)&buf, &handle) == 0 && (buf || !size),
          "bufalloc(%zu) failed or gave no buffer", size);
    owned = 1;
  } else {
    buf = malloc(size ? size : 1);
    CHECK(buf != NULL, "cannot allocate %zu bytes", size);
  }
  CHECK(ops->bufpack(app, u, buf, size) == 0, "bufpack failed");
  CHECK(ops->bufunpack(app, buf, size, &w) == 0 && w, "bufunpack failed or gave no vector");
  CHECK(ops->sum(app, -1.0, u, 1.0, w) == 0 && ops->norm(app, w, &nd) == 0, "sum/norm failed");
  CHECK(nd == 0.0, "unpack(pack(u)) differs from u: norm of the difference %g", nd);
done:
  if (u) ops->free(app, u);
  if (v) ops->free(app, v);
  if (w) ops->free(app, w);
  if (owned) ops->buffree(app, handle);
  else free(buf);
  return rc;
}
