/*
 * mgrit.h -- public interface of the braid_ext MGRIT solver core.
 *
 * Multigrid reduction in time (MGRIT) solves the forward recursion
 *
 *     u_0 = init(t_0),     u_i = Phi_i(u_{i-1})   for i = 1..N
 *
 * in parallel over the time index.  The fine grid of N+1 points is split into
 * contiguous blocks, one per rank of the communicator; a hierarchy of coarse
 * grids (every cfactor-th point of the grid below) uses the same step with a
 * larger time step, and the FAS multigrid cycle (F- or FCF-relaxation,
 * injection, coarsest grid solved sequentially across ranks, interpolation
 * by F-relaxation) converges to the sequential solution.
 *
 * When a solve stops, the last point u_N, if it is a C-point, takes the
 * value of one step from u_{N-1} (computed by the residual sweep anyway) in
 * place of its coarse-corrected value: the returned states end with an
 * ordinary step.
 *
 * Vectors are opaque to the core.  The application supplies every operation
 * on them through the callbacks of mg_Ops; the core only clones, frees, sums,
 * measures and packs them.
 *
 * Lifecycle:  mg_Init -> mg_Set* -> mg_Drive (repeatedly: a second Drive
 * continues from the previous solution) -> mg_Get* -> mg_Destroy.
 *
 * Every function returns MG_OK (0) or an error code (mg_ErrorString).
 */
#ifndef MGRIT_H
#define MGRIT_H

#include <stddef.h>
#include <stdint.h>
#include <mpi.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- error codes ------------------------------------------------------- */
enum {
  MG_OK = 0,
  MG_ERR_ARG = 1,       /* an argument or option is out of range            */
  MG_ERR_MEMORY = 2,    /* allocation failed                                 */
  MG_ERR_MPI = 3,       /* an MPI call failed                                */
  MG_ERR_CALLBACK = 4,  /* a user callback returned non-zero on this rank    */
  MG_ERR_REMOTE = 5,    /* a callback, MPI call or allocation failed on
                           another rank (mg_GetFailure says which, and what) */
  MG_ERR_NONFINITE = 6, /* the residual norm is NaN or Inf                   */
  MG_ERR_STATE = 7,     /* call not valid in the current state               */
  MG_ERR_TIMEOUT = 8    /* a wait outlasted the timeout (mg_SetTimeout):
                           mg_GetFailure names the rank that did not answer;
                           the solver cannot be used again                   */
};

/* cycle shapes */
enum { MG_CYCLE_V = 0, MG_CYCLE_F = 1 };

/* temporal norm of the residual over the C-points */
enum { MG_WAIT_BUSY = 0, MG_WAIT_SLEEP = 1 };
enum { MG_TNORM_L2 = 0, MG_TNORM_INF = 1 };

/* ---- opaque handles ---------------------------------------------------- */
typedef struct mg_Core_s *mg_Core;     /* the solver                        */
typedef struct mg_App_s *mg_App;       /* user context, never dereferenced  */
typedef struct mg_Vector_s *mg_Vector; /* user vector, never dereferenced   */

/* What a step is told.  Valid only during the callback. */
typedef struct {
  int level;       /* grid level, 0 = fine                                 */
  int64_t index;   /* fine-grid index of the step's start point            */
  int64_t index_stop; /* fine-grid index of the step's end point           */
  double t_start;  /* time of the start point                              */
  double t_stop;   /* time of the end point                                */
  int iter;        /* MGRIT iteration (0-based) of the current Drive       */
  int final;       /* 1 in the last fine sweep: every fine step is taken
                      once more, at the final state (a one-level solve is
                      such a sweep; see mg_SetFinalSweep)                  */
  mg_Vector rhs;   /* FAS right-hand side to add after the step, or NULL   */
} mg_StepStatus;

/* What an access call is told.  Valid only during the callback. */
typedef struct {
  int64_t index;   /* fine-grid index of the point                         */
  double t;        /* its time                                             */
  int iter;        /* iterations done in this Drive                        */
  int done;        /* 1 when the Drive has finished                        */
} mg_AccessStatus;

/* ---- user callbacks: return 0 on success, non-zero on failure ---------- */

/* u <- Phi(u) from status->t_start to status->t_stop, in place; then, when
 * status->rhs is not NULL, u <- u + rhs. */
typedef int (*mg_StepFn)(mg_App app, mg_Vector u, const mg_StepStatus *status);
/* a new vector holding the initial guess at time t (the initial condition at
 * t_start of the interval) */
typedef int (*mg_InitFn)(mg_App app, double t, int64_t index, mg_Vector *u_out);
/* a new vector equal to u */
typedef int (*mg_CloneFn)(mg_App app, mg_Vector u, mg_Vector *v_out);
/* release u */
typedef int (*mg_FreeFn)(mg_App app, mg_Vector u);
/* y <- alpha*x + beta*y */
typedef int (*mg_SumFn)(mg_App app, double alpha, mg_Vector x, double beta,
                        mg_Vector y);
/* the spatial norm of u (any norm; the 2-norm is usual) */
typedef int (*mg_NormFn)(mg_App app, mg_Vector u, double *norm_out);
/* an upper bound on the bytes bufpack writes */
typedef int (*mg_BufSizeFn)(mg_App app, size_t *size_out);
/* write u into buffer (size bytes available) */
typedef int (*mg_BufPackFn)(mg_App app, mg_Vector u, void *buffer, size_t size);
/* a new vector read from buffer */
typedef int (*mg_BufUnpackFn)(mg_App app, const void *buffer, size_t size,
                              mg_Vector *u_out);
/* look at the solution at one point; optional */
typedef int (*mg_AccessFn)(mg_App app, mg_Vector u, const mg_AccessStatus *status);
/* Message buffers owned by the application (optional, both or neither): a
 * buffer of size bytes whose address MPI reads or writes (*buffer_out: host
 * memory, or device memory where the MPI library reads it), and a handle the
 * core passes back to buffree.  The core keeps its buffers from solve to
 * solve (no allocation per message) and hands the same addresses to
 * bufpack/bufunpack.  With them the core never reads or writes a buffer
 * itself: each message's header travels as a message of its own. */
typedef int (*mg_BufAllocFn)(mg_App app, size_t size, void **buffer_out, void **handle_out);
typedef int (*mg_BufFreeFn)(mg_App app, void *handle);

/* The operations the application provides.  access, bufalloc and buffree
 * may be NULL (without buffer callbacks the core allocates its buffers). */
typedef struct {
  mg_StepFn step;
  mg_InitFn init;
  mg_CloneFn clone;
  mg_FreeFn free;
  mg_SumFn sum;
  mg_NormFn norm;
  mg_BufSizeFn bufsize;
  mg_BufPackFn bufpack;
  mg_BufUnpackFn bufunpack;
  mg_AccessFn access;
  mg_BufAllocFn bufalloc;
  mg_BufFreeFn buffree;
} mg_Ops;

/* Counters of one rank (mg_GetStats with reduce = 0) or of all ranks
 * (reduce = 1: counts and bytes summed, times and clock maximised). */
#define MG_MAX_LEVELS 32
typedef struct {
  int iterations;                   /* MGRIT iterations of the last Drive  */
  int nlevels;                      /* grid levels of the last Drive       */
  int64_t steps[MG_MAX_LEVELS];     /* step calls per level                */
  int64_t calls;                    /* all callback calls                  */
  int64_t messages;                 /* point-to-point messages sent        */
  int64_t bytes;                    /* bytes in those messages             */
  int64_t buffers;                  /* message buffers allocated (kept for
                                       the next solves: none per message)  */
  double callback_time;             /* seconds inside user callbacks       */
  double total_time;                /* seconds inside mg_Drive             */
  double virtual_time;              /* modelled parallel time (clock)      */
} mg_Stats;

/* ---- lifecycle --------------------------------------------------------- */

/* Create a solver for nsteps steps on [t_start, t_stop] (t_stop < t_start is
 * allowed).  comm is duplicated; 1 <= size(comm) <= nsteps is required, and
 * ops->access must be given on every rank or on none.  Collective over comm. */
int mg_Init(MPI_Comm comm, double t_start, double t_stop, int64_t nsteps,
            mg_App app, const mg_Ops *ops, mg_Core *core_out);
/* Solve.  Collective.  Every rank leaves a failed solve together: the rank
 * where a callback, an MPI call or an allocation failed returns that error
 * (MG_ERR_CALLBACK, MG_ERR_MPI, MG_ERR_MEMORY), every other rank
 * MG_ERR_REMOTE; a NaN/Inf residual is MG_ERR_NONFINITE everywhere.  With a
 * timeout, a rank that stops answering makes the others return
 * MG_ERR_TIMEOUT within about the timeout (a message that is never sent,
 * after an MPI error, is such a case too). */
int mg_Drive(mg_Core core);
/* Free the solver and every vector it holds.  Collective (frees the
 * duplicated communicator); *core is set to NULL. */
int mg_Destroy(mg_Core *core);

/* ---- options: call before mg_Drive; a level of -1 means all levels ----- */
int mg_SetMaxLevels(mg_Core core, int max_levels);          /* >= 1, default 2  */
int mg_SetMinCoarse(mg_Core core, int64_t min_coarse);      /* >= 1, default 2  */
int mg_SetCFactor(mg_Core core, int level, int cfactor);    /* >= 2, default 2  */
int mg_SetNRelax(mg_Core core, int level, int nrelax);      /* CF sweeps >= 0, default 1 (FCF) */
int mg_SetCycle(mg_Core core, int cycle);                   /* MG_CYCLE_V / _F  */
int mg_SetSkip(mg_Core core, int skip);                     /* skip first down-cycle work */
int mg_SetAbsTol(mg_Core core, double atol);                /* >= 0, default 1e-10; 0 = off */
int mg_SetRelTol(mg_Core core, double rtol);                /* >= 0, default 0 = off */
int mg_SetMaxIter(mg_Core core, int max_iter);              /* >= 1, default 100 */
int mg_SetTemporalNorm(mg_Core core, int tnorm);            /* MG_TNORM_*       */
int mg_SetStoreAll(mg_Core core, int store_all);            /* keep fine F-points */
int mg_SetReverse(mg_Core core, int reverse);               /* last rank holds t_start */
int mg_SetWarmStart(mg_Core core, int warm);                /* default 1        */
int mg_SetStepCost(mg_Core core, int level, double cost);   /* virtual clock; default 1 */
int mg_SetLatency(mg_Core core, double latency);            /* virtual clock; default 0 */
/* The longest any wait for other ranks may last, in seconds; 0 (default) is
 * no limit.  Waits then poll (MPI_Test) instead of blocking.  Same on every
 * rank. */
int mg_SetTimeout(mg_Core core, double seconds);
/* How a wait without a timeout waits: MG_WAIT_BUSY (MPI_Wait, which may poll
 * the network busily and keep a core) or MG_WAIT_SLEEP (MPI_Test with naps
 * from a few microseconds growing to 1 ms: a rank that waits leaves its core
 * to ranks that work, for the price of some latency).  Default busy. */
int mg_SetWait(mg_Core core, int wait);
/* The largest count one MPI call is given, in bytes (default INT_MAX):
 * longer messages travel as one message of a derived datatype.  Lowering it
 * exercises that path with small messages. */
int mg_SetMaxCount(mg_Core core, int64_t max_count);
/* Take every fine step once at the final state with status->final = 1, e.g.
 * to compute gradients from it; default 0.  When the solve runs to max_iter,
 * the residual sweep of the last iteration is that sweep; when it converges
 * earlier, one more fine sweep follows. */
int mg_SetFinalSweep(mg_Core core, int final_sweep);

/* ---- results ----------------------------------------------------------- */
int mg_GetNumIter(mg_Core core, int *iter_out);
int mg_GetNumLevels(mg_Core core, int *nlevels_out);
/* copies up to max residual norms of the last Drive; *n_out = how many exist */
int mg_GetResidualNorms(mg_Core core, double *norms, int max, int *n_out);
/* The getters of the grid (levels, ranges, sizes) work before the first
 * Drive too: the levels are then built from the options set so far. */
/* the owned point range [*lo, *hi] on a level (lo > hi when empty) */
int mg_GetLocalRange(mg_Core core, int level, int64_t *lo, int64_t *hi);
/* the number of points - 1 on a level, and the fine-grid stride of its points */
int mg_GetLevelSize(mg_Core core, int level, int64_t *npoints_minus_1,
                    int64_t *stride);
/* the vector held at fine point index (owned and stored), borrowed: valid
 * until the next Drive or Destroy */
int mg_GetVector(mg_Core core, int64_t index, mg_Vector *u_out);
/* install u (taken over: the core frees it) as the solution at fine point
 * index (owned here and stored), the initial guess of the next warm-started
 * Drive; the core holds a solution once every stored point it owns has one.
 * Local; a Drive starts warm only where every rank that owns a stored point
 * holds a solution (a rank that owns none agrees). */
int mg_SetVector(mg_Core core, int64_t index, mg_Vector u);
/* is the fine point stored after Drive (C-points and the last point; on one
 * level the first and the last point; all points with store_all)? */
int mg_IsStored(mg_Core core, int64_t index, int *stored_out);
/* statistics of the last Drive; reduce = 1 is collective */
int mg_GetStats(mg_Core core, int reduce, mg_Stats *stats_out);
/* after a failed Drive: the failing rank and the fine index it was working
 * at (-1 if unknown) */
int mg_GetFailure(mg_Core core, int *rank_out, int64_t *index_out);
/* after a failed Drive: what failed on that rank (MG_ERR_CALLBACK, MG_ERR_MPI,
 * MG_ERR_MEMORY or MG_ERR_TIMEOUT), 0 if unknown */
int mg_GetFailureCode(mg_Core core, int *code_out);
/* the rank of this process in the solver's communicator */
int mg_GetRank(mg_Core core, int *rank_out);

/* ---- utilities --------------------------------------------------------- */
/* The layout of N steps (layers) over P ranks, the one every solver uses
 * (forward order): fine points 1..N in P contiguous blocks of nearly equal
 * size, point 0 with the first.  [*lo, *hi] are the fine points of the block
 * of time-ordered rank q, lo = q*N/P + 1 (0 for q = 0), hi = (q+1)*N/P,
 * rounded down.  Step (layer) n, from point n to n+1, is held by the owner
 * of point n+1: *owner.  MG_ERR_ARG unless 1 <= P <= N, 0 <= q < P and
 * 0 <= n < N.  Need no solver and no communicator. */
int mg_BlockRange(int64_t N, int P, int q, int64_t *lo, int64_t *hi);
int mg_LayerOwner(int64_t N, int P, int64_t n, int *owner);
/* The grid hierarchy every solver builds for nsteps steps: level 0 is the
 * fine grid; level l+1 exists when l+1 < max_levels and n_l / m_l >=
 * min_coarse, and then has n_{l+1} = n_l / m_l points after point 0 (rounded
 * down), m_l = cfactor[min(l, ncfactor - 1)] (the last factor holds for the
 * levels below).  Outputs: *nlevels, and per level n[l] (its points are
 * 0..n[l]) and stride[l] (point j is fine point j*stride[l]); n and stride
 * need room for MG_MAX_LEVELS entries.  MG_ERR_ARG unless nsteps >= 1,
 * 1 <= max_levels <= MG_MAX_LEVELS, min_coarse >= 1, 1 <= ncfactor <=
 * MG_MAX_LEVELS and every factor >= 2.  Needs no solver. */
int mg_Hierarchy(int64_t nsteps, int max_levels, int64_t min_coarse, const int *cfactor,
                 int ncfactor, int *nlevels, int64_t *n, int64_t *stride);
const char *mg_ErrorString(int code);
/* 1 when the MPI library says at run time that it reads and writes CUDA
 * device memory (MPIX_Query_cuda_support of MPICH >= 4 and Open MPI), else
 * 0.  May be called before MPI_Init. */
int mg_MPICudaSupport(void);
/* Exercise an application's clone/sum/norm/pack/unpack on a vector made by
 * init(t): returns MG_OK, or MG_ERR_CALLBACK with a message in msg. */
int mg_CheckApp(mg_App app, const mg_Ops *ops, double t, char *msg, size_t msglen);

#ifdef __cplusplus
}
#endif
#endif /* MGRIT_H */
