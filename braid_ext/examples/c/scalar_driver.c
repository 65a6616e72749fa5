/*
 * scalar_driver.c -- the MGRIT core driven from C alone.
 *
 * Solves u' = lambda*u on [0, T], u(0) = 1, with backward Euler
 * (u_{i} = u_{i-1} / (1 - lambda*dt)), and prints one line per residual and a
 * summary with the solution error against sequential stepping and the
 * virtual-clock speedup over sequential stepping.
 *
 *   mpiexec -n 4 scalar_driver -n 4096 -levels 3 -cf 4 -nrelax 1 -cycle V
 *       -tol 1e-12 -maxiter 50 -lambda -1 -tstop 1 -latency 0 -timeout 0 -quiet
 *       [-skip] [-storeall] [-final] [-drives K]
 *
 * -skip skips the first down-cycle, -storeall keeps every fine point, -final
 * asks for the final fine sweep, and -drives K solves K times, each solve
 * warm-started from the last (the error is that of the last solve).
 *
 * Output (rank 0): "rnorm <k> <norm>" per iteration, then
 *   "summary iters <k> levels <L> error <e> vtime <v> seqtime <s> speedup <x>"
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "mgrit.h"

struct mg_App_s { double lambda; int backward; };
struct mg_Vector_s { double value; };

static mg_Vector new_vec(double v) {
  mg_Vector u = malloc(sizeof(*u));
  if (u) u->value = v;
  return u;
}

static int step(mg_App app, mg_Vector u, const mg_StepStatus *st) {
  double dt = st->t_stop - st->t_start;
  if (app->backward) u->value /= 1.0 - app->lambda * dt;
  else u->value *= 1.0 + app->lambda * dt;
  if (st->rhs) u->value += st->rhs->value;
  return 0;
}

static int init(mg_App app, double t, int64_t index, mg_Vector *out) {
  (void)app; (void)t;
  *out = new_vec(index == 0 ? 1.0 : 0.0);
  return *out ? 0 : 1;
}

static int clone(mg_App app, mg_Vector u, mg_Vector *out) {
  (void)app;
  *out = new_vec(u->value);
  return *out ? 0 : 1;
}

static int vfree(mg_App app, mg_Vector u) { (void)app; free(u); return 0; }

static int sum(mg_App app, double a, mg_Vector x, double b, mg_Vector y) {
  (void)app;
  y->value = a * x->value + b * y->value;
  return 0;
}

static int norm(mg_App app, mg_Vector u, double *out) {
  (void)app;
  *out = fabs(u->value);
  return 0;
}

static int bufsize(mg_App app, size_t *out) { (void)app; *out = sizeof(double); return 0; }

static int pack(mg_App app, mg_Vector u, void *buf, size_t n) {
  (void)app; (void)n;
  memcpy(buf, &u->value, sizeof(double));
  return 0;
}

static int unpack(mg_App app, const void *buf, size_t n, mg_Vector *out) {
  (void)app; (void)n;
  double v;
  memcpy(&v, buf, sizeof(double));
  *out = new_vec(v);
  return *out ? 0 : 1;
}

#define TRY(call)                                                             \
  do {                                                                        \
    int e_ = (call);                                                          \
    if (e_ != MG_OK) {                                                        \
      fprintf(stderr, "scalar_driver: %s failed: %s\n", #call,                \
              mg_ErrorString(e_));                                            \
      MPI_Abort(MPI_COMM_WORLD, 1);                                           \
    }                                                                         \
  } while (0)

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  int rank, size;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);

  long long n = 4096;
  int levels = 3, cf = 4, nrelax = 1, maxiter = 50, quiet = 0, fcycle = 0;
  int skip = 0, storeall = 0, final = 0, drives = 1;
  double tol = 1e-12, lambda = -1.0, tstop = 1.0, latency = 0.0, timeout = 0.0;
  struct mg_App_s app = {-1.0, 1};
  for (int k = 1; k < argc; k++) {
    const char *a = argv[k], *v = k + 1 < argc ? argv[k + 1] : "";
    if (!strcmp(a, "-n")) { n = atoll(v); k++; }
    else if (!strcmp(a, "-levels")) { levels = atoi(v); k++; }
    else if (!strcmp(a, "-cf")) { cf = atoi(v); k++; }
    else if (!strcmp(a, "-nrelax")) { nrelax = atoi(v); k++; }
    else if (!strcmp(a, "-maxiter")) { maxiter = atoi(v); k++; }
    else if (!strcmp(a, "-tol")) { tol = atof(v); k++; }
    else if (!strcmp(a, "-lambda")) { lambda = atof(v); k++; }
    else if (!strcmp(a, "-tstop")) { tstop = atof(v); k++; }
    else if (!strcmp(a, "-latency")) { latency = atof(v); k++; }
    else if (!strcmp(a, "-timeout")) { timeout = atof(v); k++; }
    else if (!strcmp(a, "-cycle")) { fcycle = !strcmp(v, "F"); k++; }
    else if (!strcmp(a, "-forward")) { app.backward = 0; }
    else if (!strcmp(a, "-quiet")) { quiet = 1; }
    else if (!strcmp(a, "-skip")) { skip = 1; }
    else if (!strcmp(a, "-storeall")) { storeall = 1; }
    else if (!strcmp(a, "-final")) { final = 1; }
    else if (!strcmp(a, "-drives")) { drives = atoi(v); k++; }
    else {
      if (rank == 0) fprintf(stderr, "scalar_driver: unknown option %s\n", a);
      MPI_Finalize();
      return 2;
    }
  }
  app.lambda = lambda;

  mg_Ops ops = {step, init, clone, vfree, sum, norm, bufsize, pack, unpack, NULL};
  char msg[256];
  TRY(mg_CheckApp(&app, &ops, 0.0, msg, sizeof msg));

  mg_Core core;
  TRY(mg_Init(MPI_COMM_WORLD, 0.0, tstop, (int64_t)n, &app, &ops, &core));
  TRY(mg_SetMaxLevels(core, levels));
  TRY(mg_SetCFactor(core, -1, cf));
  TRY(mg_SetNRelax(core, -1, nrelax));
  TRY(mg_SetCycle(core, fcycle ? MG_CYCLE_F : MG_CYCLE_V));
  TRY(mg_SetAbsTol(core, tol));
  TRY(mg_SetMaxIter(core, maxiter));
  TRY(mg_SetLatency(core, latency));
  TRY(mg_SetTimeout(core, timeout));
  TRY(mg_SetSkip(core, skip));
  TRY(mg_SetStoreAll(core, storeall));
  TRY(mg_SetFinalSweep(core, final));
  for (int d = 0; d < drives; d++) TRY(mg_Drive(core));

  int iters, nl, nr;
  double rn[1024];
  TRY(mg_GetNumIter(core, &iters));
  TRY(mg_GetNumLevels(core, &nl));
  TRY(mg_GetResidualNorms(core, rn, 1024, &nr));

  /* error against sequential stepping at the points this rank owns */
  int64_t lo, hi;
  TRY(mg_GetLocalRange(core, 0, &lo, &hi));
  double u = 1.0, err = 0.0, dt = tstop / (double)n;
  struct mg_Vector_s tmp;
  for (int64_t i = 0; i <= hi; i++) {
    if (i > 0) {
      tmp.value = u;
      mg_StepStatus st = {0, i - 1, i, (i - 1) * dt, i * dt, 0, 0, NULL};
      step(&app, &tmp, &st);
      u = tmp.value;
    }
    int stored = 0;
    if (i >= lo) TRY(mg_IsStored(core, i, &stored));
    if (stored) {
      mg_Vector v;
      TRY(mg_GetVector(core, i, &v));
      double e = fabs(v->value - u) / (fabs(u) > 1e-300 ? fabs(u) : 1.0);
      if (e > err) err = e;
    }
  }
  double gerr;
  MPI_Allreduce(&err, &gerr, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);

  mg_Stats st;
  TRY(mg_GetStats(core, 1, &st));
  if (rank == 0) {
    if (!quiet)
      for (int k = 0; k < nr && k < 1024; k++) printf("rnorm %d %.17e\n", k, rn[k]);
    /* sequential stepping costs n steps of unit cost */
    printf("summary ranks %d iters %d levels %d error %.3e vtime %.6g seqtime %lld "
           "speedup %.4f steps0 %lld messages %lld\n",
           size, iters, nl, gerr, st.virtual_time, n, (double)n / st.virtual_time,
           (long long)st.steps[0], (long long)st.messages);
  }
  TRY(mg_Destroy(&core));
  MPI_Finalize();
  return 0;
}
