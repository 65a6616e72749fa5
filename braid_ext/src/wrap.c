/*
 * wrap.c -- the one place where the core calls user code.
 *
 * Each wrapper times the call, counts it, checks its return code and, once a
 * callback has failed on this rank or a failure has arrived from another
 * rank, does nothing at all: the sweeps keep their message schedule (so no
 * rank waits forever) but no more user work is done until every rank has
 * agreed on the failure at the next allreduce.  The failure state of the
 * core is set here alone (mg_FailLocal), also for the core's own MPI and
 * memory errors: this file calls no other file of the core.
 */
#include <math.h>
#include <stdlib.h>
#include "mgrit_impl.h"

/* A failure on this rank (a callback, or an MPI call or allocation of the
 * core): it stops the user work here and is passed on in the messages and at
 * the next agreement, so that every rank leaves the solve together.  The
 * first failure is the one reported. */
void mg_FailLocal(mg_Core core, int code) {
  if (!core->failed) {
    core->failed = code;
    core->fail_code = code;
    core->fail_rank = core->rank;
    core->fail_index = core->cur_index;
  }
}

static void fail(mg_Core core) { mg_FailLocal(core, MG_ERR_CALLBACK); }

/* the time of fine point i (the last point is t1 exactly) */
static double time_of(mg_Core core, int64_t i) {
  if (i == core->nsteps) return core->t1;
  return core->t0 + (core->t1 - core->t0) * ((double)i / (double)core->nsteps);
}

#define TIMED_CALL(core, call, ok)                                            \
  do {                                                                        \
    double t_ = MPI_Wtime();                                                  \
    ok = ((call) == 0);                                                       \
    (core)->stats.callback_time += MPI_Wtime() - t_;                          \
    (core)->stats.calls++;                                                    \
    if (!ok) fail(core);                                                      \
  } while (0)

void mg_ClockStep(mg_Core core, int level) {
  core->clock += core->step_cost[level];
}

void mg_CallStep(mg_Core core, int level, int64_t j_start, mg_Vector u,
                 mg_Vector rhs) {
  if (core->failed || !u) return;
  const mg_Level *lev = &core->levels[level];
  mg_StepStatus st;
  st.level = level;
  st.index = j_start * lev->stride;
  st.index_stop = (j_start + 1) * lev->stride;
  st.t_start = time_of(core, st.index);
  st.t_stop = time_of(core, st.index_stop);
  st.iter = core->iter;
  st.final = core->in_final && level == 0;
  st.rhs = rhs;
  core->cur_index = st.index;
  int ok;
  TIMED_CALL(core, core->ops.step(core->app, u, &st), ok);
  (void)ok;
  core->stats.steps[level]++;
  mg_ClockStep(core, level);
}

mg_Vector mg_CallInit(mg_Core core, int level, int64_t j) {
  if (core->failed) return NULL;
  mg_Vector u = NULL;
  int64_t i = j * core->levels[level].stride;
  core->cur_index = i;
  int ok;
  TIMED_CALL(core, core->ops.init(core->app, time_of(core, i), i, &u), ok);
  if (ok && !u) fail(core);
  return ok ? u : NULL;
}

mg_Vector mg_CallClone(mg_Core core, mg_Vector u) {
  if (core->failed || !u) return NULL;
  mg_Vector v = NULL;
  int ok;
  TIMED_CALL(core, core->ops.clone(core->app, u, &v), ok);
  if (ok && !v) fail(core);
  return ok ? v : NULL;
}

/* Frees even after a failure: the vectors still belong to the app. */
void mg_CallFree(mg_Core core, mg_Vector *u) {
  if (!*u) return;
  int ok;
  TIMED_CALL(core, core->ops.free(core->app, *u), ok);
  (void)ok;
  *u = NULL;
}

void mg_CallSum(mg_Core core, double a, mg_Vector x, double b, mg_Vector y) {
  if (core->failed || !x || !y) return;
  int ok;
  TIMED_CALL(core, core->ops.sum(core->app, a, x, b, y), ok);
  (void)ok;
}

double mg_CallNorm(mg_Core core, mg_Vector u) {
  if (core->failed || !u) return 0.0;
  double nrm = 0.0;
  int ok;
  TIMED_CALL(core, core->ops.norm(core->app, u, &nrm), ok);
  return ok ? nrm : 0.0;
}

void mg_CallAccess(mg_Core core, mg_Vector u, int64_t i, int done) {
  if (core->failed || !u || !core->ops.access) return;
  mg_AccessStatus st;
  st.index = i;
  st.t = time_of(core, i);
  st.iter = core->iter;
  st.done = done;
  core->cur_index = i;
  int ok;
  TIMED_CALL(core, core->ops.access(core->app, u, &st), ok);
  (void)ok;
}

int mg_CallPack(mg_Core core, mg_Vector u, void *buf) {
  if (core->failed || !u) return 0;
  int ok;
  TIMED_CALL(core, core->ops.bufpack(core->app, u, buf, core->bufsize), ok);
  return ok;
}

mg_Vector mg_CallUnpack(mg_Core core, const void *buf) {
  if (core->failed) return NULL;
  mg_Vector u = NULL;
  int ok;
  TIMED_CALL(core, core->ops.bufunpack(core->app, buf, core->bufsize, &u), ok);
  if (ok && !u) fail(core);
  return ok ? u : NULL;
}

int mg_CallBufSize(mg_Core core, size_t *size) {
  if (core->failed) return 0;
  int ok;
  *size = 0;
  TIMED_CALL(core, core->ops.bufsize(core->app, size), ok);
  return ok;
}

/* A message buffer for the current message size: from the application
 * (payload only) or malloc'd (header and payload); NULL on failure, which
 * is recorded.  Counted: the core keeps its buffers, so a solve that needs
 * no more than the last one allocates none. */
mg_Buf *mg_BufNew(mg_Core core) {
  mg_Buf *b = calloc(1, sizeof(*b));
  if (!b) {
    mg_FailLocal(core, MG_ERR_MEMORY);
    return NULL;
  }
  if (core->app_buffers) {
    b->size = core->bufsize;
    void *data = NULL;
    int ok;
    TIMED_CALL(core, core->ops.bufalloc(core->app, b->size, &data, &b->handle), ok);
    if (ok && !data && b->size > 0) fail(core), ok = 0;
    b->data = data;
    if (!ok) {
      free(b);
      return NULL;
    }
  } else {
    b->size = core->msgsize;
    b->data = malloc(b->size);
    if (!b->data) {
      free(b);
      mg_FailLocal(core, MG_ERR_MEMORY);
      return NULL;
    }
  }
  core->stats.buffers++;
  return b;
}

/* Give a buffer back to whoever made it (also after a failure). */
void mg_BufDelete(mg_Core core, mg_Buf *b) {
  if (!b) return;
  if (core->app_buffers) core->ops.buffree(core->app, b->handle);
  else free(b->data);
  free(b);
}

/* *dst <- a clone of src (the old *dst is freed) */
void mg_Assign(mg_Core core, mg_Vector *dst, mg_Vector src) {
  mg_Vector v = mg_CallClone(core, src);
  mg_CallFree(core, dst);
  *dst = v;
}
