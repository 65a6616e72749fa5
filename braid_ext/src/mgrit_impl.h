/*
 * mgrit_impl.h -- private structures and internal functions of the core.
 */
#ifndef MGRIT_IMPL_H
#define MGRIT_IMPL_H

#include "mgrit.h"

/* One grid level as seen by one rank. */
typedef struct {
  int64_t n;        /* last point index: points are 0..n                    */
  int64_t stride;   /* fine-grid index of point j is j*stride               */
  int cfactor;      /* coarsening factor to the next level (0 on coarsest)  */
  int nrelax;       /* CF sweeps after the first F sweep                    */
  int64_t lo, hi;   /* owned points [lo, hi]; lo > hi when empty            */
  int left, right;  /* communicator ranks holding lo-1 and hi+1, or -1      */
  mg_Vector *u;     /* u[j-lo]: solution (NULL where not stored)            */
  mg_Vector *g;     /* g[j-lo]: FAS right-hand side (NULL on level 0)       */
  mg_Vector *w;     /* w[j-lo]: sweep work values at C-points               */
  double *rn;       /* rn[j-lo]: residual norm at the fine C-point of coarse
                       point j, measured during the sweep (MG_SW_NORM)      */
} mg_Level;

/* A message buffer, kept from solve to solve (a free list in the core).
 * Core-owned buffers hold [header | payload]; application-owned ones
 * (mg_BufAllocFn) hold the payload alone and the header travels from head. */
typedef struct mg_Buf_s {
  struct mg_Buf_s *next; /* the next free buffer                            */
  char *data;            /* what MPI reads or writes                         */
  void *handle;          /* the application's handle, NULL when core-owned   */
  size_t size;           /* bytes at data                                    */
  double head[2];        /* the header of an application-owned buffer        */
} mg_Buf;

/* A posted receive or send: the payload's request, and the header's when
 * it travels apart (application-owned buffers). */
typedef struct {
  MPI_Request req, hreq;
  mg_Buf *buf;
  int peer;
  int active;
} mg_Msg;

struct mg_Core_s {
  /* problem */
  MPI_Comm comm;
  int rank, size;
  double t0, t1;
  int64_t nsteps;
  mg_App app;
  mg_Ops ops;

  /* options */
  int max_levels;
  int64_t min_coarse;
  int cfactor[MG_MAX_LEVELS];
  int nrelax[MG_MAX_LEVELS];
  double step_cost[MG_MAX_LEVELS];
  int cycle, skip, max_iter, tnorm, store_all, reverse, warm, final_sweep;
  double atol, rtol, latency;

  /* hierarchy (built by mg_Drive) */
  int nlevels;
  mg_Level levels[MG_MAX_LEVELS];
  int have_solution; /* level-0 u holds the last converged state          */
  int warm_now;      /* this Drive starts from the held solution (agreed)  */
  int built_reverse; /* distribution the hierarchy was built with          */

  /* communication */
  size_t bufsize;    /* user payload bytes                                 */
  size_t msgsize;    /* header + payload                                   */
  mg_Msg *sends;     /* outstanding sends of the current sweep             */
  int nsends, capsends;
  mg_Buf *rbuf;      /* the receive buffer                                 */
  size_t rbufcap;    /* the message size it was made for (agreed by all)   */
  mg_Buf *freebufs;  /* send buffers not in use, kept for the next sends    */
  int app_buffers;   /* the application owns the buffers: header apart     */
  int64_t max_count; /* the largest count of one MPI call                  */
  MPI_Datatype bigtype; /* the derived type of bigtype_bytes bytes, or NULL */
  size_t bigtype_bytes;
  int wait;          /* MG_WAIT_BUSY or MG_WAIT_SLEEP                      */
  double timeout;    /* seconds a wait may last; 0 = no limit              */
  int broken;        /* a wait timed out: requests may be left pending     */

  /* results */
  int iter;          /* current / final iteration                          */
  int in_final;      /* the current sweep is the final fine sweep          */
  int final_done;    /* this Drive has had its final fine sweep            */
  double *rnorms;
  int nrnorms, caprnorms;

  /* failure state: once set, callbacks are skipped but the message schedule
   * goes on so that every rank reaches the next agreement point */
  int failed;        /* 0, MG_ERR_REMOTE, or what failed here: MG_ERR_CALLBACK,
                        MG_ERR_MPI, MG_ERR_MEMORY (or MG_ERR_TIMEOUT)       */
  int fail_code;     /* what failed on fail_rank (known after agreement)   */
  int64_t fail_index;
  int fail_rank;
  int64_t cur_index; /* fine index of the callback in progress             */
  int64_t nonfinite; /* first fine index with a NaN/Inf residual, or -1    */

  /* statistics */
  mg_Stats stats;
  double clock;      /* virtual clock                                      */
};

/* hierarchy.c */
int mg_BuildHierarchy(mg_Core core);
void mg_FreeHierarchy(mg_Core core, int keep_fine);
void mg_FreeCoarse(mg_Core core);
int mg_Owner(mg_Core core, int level, int64_t j);
int mg_FineStored(mg_Core core, int64_t j);

/* wrap.c: every user call goes through these (timing, counting, failure),
 * and every failure on this rank is recorded by mg_FailLocal */
void mg_FailLocal(mg_Core core, int code);
void mg_CallStep(mg_Core core, int level, int64_t j_start, mg_Vector u,
                 mg_Vector rhs);
mg_Vector mg_CallInit(mg_Core core, int level, int64_t j);
mg_Vector mg_CallClone(mg_Core core, mg_Vector u);
void mg_CallFree(mg_Core core, mg_Vector *u);
void mg_CallSum(mg_Core core, double a, mg_Vector x, double b, mg_Vector y);
double mg_CallNorm(mg_Core core, mg_Vector u);
void mg_CallAccess(mg_Core core, mg_Vector u, int64_t fine_index, int done);
int mg_CallPack(mg_Core core, mg_Vector u, void *buf);
mg_Vector mg_CallUnpack(mg_Core core, const void *buf);
int mg_CallBufSize(mg_Core core, size_t *size);
mg_Buf *mg_BufNew(mg_Core core);
void mg_BufDelete(mg_Core core, mg_Buf *b);
void mg_Assign(mg_Core core, mg_Vector *dst, mg_Vector src);

/* comm.c */
int mg_SendVector(mg_Core core, int dest, int tag, mg_Vector u);
int mg_PostRecv(mg_Core core, int source, int tag, mg_Msg *msg);
int mg_FinishRecv(mg_Core core, mg_Msg *msg, mg_Vector *u_out);
int mg_WaitSends(mg_Core core);
int mg_EnsureRecvBuffer(mg_Core core);
void mg_FreeBuffers(mg_Core core);
int mg_AgreeNorm(mg_Core core, double local, int64_t bad, double *global,
                 int64_t *bad_global);
int mg_AgreeFailure(mg_Core core);
int mg_Allreduce(mg_Core core, const void *in, void *out, int count,
                 MPI_Datatype type, MPI_Op op);

/* relax.c */
enum {
  MG_SW_F = 1,       /* step the F-points                                  */
  MG_SW_C = 2,       /* compute w = Phi(u_{j-1}) [+ g] at C-points j >= 1  */
  MG_SW_NORHS = 4,   /* leave g out of the C-point values                  */
  MG_SW_ASSIGN = 8,  /* u <- w at C-points after the sweep (C-relaxation)  */
  MG_SW_ACCESS = 16, /* call access at every point                         */
  MG_SW_NORM = 32,   /* with MG_SW_C: measure |w_j - u_j| at once and drop
                        w_j (kept at the last point)                        */
  MG_SW_FAS = 64     /* with MG_SW_C on level l+1 (l the level below):
                        g_j <- w^l_{j*m} - w_j at once, both dropped       */
};
int mg_Sweep(mg_Core core, int level, int64_t m, int flags);
int mg_Relax(mg_Core core, int level);

/* restrict.c */
int mg_Residual(mg_Core core, int level, double *rnorm, int64_t *bad, int drop_w);
int mg_Restrict(mg_Core core, int level, int inject_only);
int mg_Correct(mg_Core core, int level);

/* stats */
void mg_ClockStep(mg_Core core, int level);

#define MG_CHK(expr)                                                          \
  do {                                                                        \
    int mg_chk_ = (expr);                                                     \
    if (mg_chk_ != MG_OK) return mg_chk_;                                     \
  } while (0)

#endif /* MGRIT_IMPL_H */
