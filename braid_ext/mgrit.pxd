# Declarations of the C core (src/mgrit.h) for the Cython binding.
from libc.stdint cimport int64_t

cdef extern from "mpi.h" nogil:
    ctypedef struct MPI_Comm:
        pass
    double MPI_Wtime()
    int MPI_Finalized(int *flag)

cdef extern from "mgrit.h":
    enum:
        MG_OK
        MG_ERR_ARG
        MG_ERR_MEMORY
        MG_ERR_MPI
        MG_ERR_CALLBACK
        MG_ERR_REMOTE
        MG_ERR_NONFINITE
        MG_ERR_STATE
        MG_ERR_TIMEOUT
        MG_CYCLE_V
        MG_CYCLE_F
        MG_TNORM_L2
        MG_TNORM_INF
        MG_WAIT_BUSY
        MG_WAIT_SLEEP
        MG_MAX_LEVELS

    ctypedef struct mg_Core_s
    ctypedef mg_Core_s* mg_Core
    ctypedef struct mg_App_s
    ctypedef mg_App_s* mg_App
    ctypedef struct mg_Vector_s
    ctypedef mg_Vector_s* mg_Vector

    ctypedef struct mg_StepStatus:
        int level
        int64_t index
        int64_t index_stop
        double t_start
        double t_stop
        int iter
        int final
        mg_Vector rhs

    ctypedef struct mg_AccessStatus:
        int64_t index
        double t
        int iter
        int done

    ctypedef int (*mg_StepFn)(mg_App, mg_Vector, const mg_StepStatus*) noexcept nogil
    ctypedef int (*mg_InitFn)(mg_App, double, int64_t, mg_Vector*) noexcept nogil
    ctypedef int (*mg_CloneFn)(mg_App, mg_Vector, mg_Vector*) noexcept nogil
    ctypedef int (*mg_FreeFn)(mg_App, mg_Vector) noexcept nogil
    ctypedef int (*mg_SumFn)(mg_App, double, mg_Vector, double, mg_Vector) noexcept nogil
    ctypedef int (*mg_NormFn)(mg_App, mg_Vector, double*) noexcept nogil
    ctypedef int (*mg_BufSizeFn)(mg_App, size_t*) noexcept nogil
    ctypedef int (*mg_BufPackFn)(mg_App, mg_Vector, void*, size_t) noexcept nogil
    ctypedef int (*mg_BufUnpackFn)(mg_App, const void*, size_t, mg_Vector*) noexcept nogil
    ctypedef int (*mg_AccessFn)(mg_App, mg_Vector, const mg_AccessStatus*) noexcept nogil
    ctypedef int (*mg_BufAllocFn)(mg_App, size_t, void**, void**) noexcept nogil
    ctypedef int (*mg_BufFreeFn)(mg_App, void*) noexcept nogil

    ctypedef struct mg_Ops:
        mg_StepFn step
        mg_InitFn init
        mg_CloneFn clone
        mg_FreeFn free
        mg_SumFn sum
        mg_NormFn norm
        mg_BufSizeFn bufsize
        mg_BufPackFn bufpack
        mg_BufUnpackFn bufunpack
        mg_AccessFn access
        mg_BufAllocFn bufalloc
        mg_BufFreeFn buffree

    ctypedef struct mg_Stats:
        int iterations
        int nlevels
        int64_t steps[32]
        int64_t calls
        int64_t messages
        int64_t bytes
        int64_t buffers
        double callback_time
        double total_time
        double virtual_time

    int mg_Init(MPI_Comm comm, double t_start, double t_stop, int64_t nsteps,
                mg_App app, const mg_Ops *ops, mg_Core *core_out)
    int mg_Drive(mg_Core core) nogil
    int mg_Destroy(mg_Core *core) nogil

    int mg_SetMaxLevels(mg_Core core, int max_levels)
    int mg_SetMinCoarse(mg_Core core, int64_t min_coarse)
    int mg_SetCFactor(mg_Core core, int level, int cfactor)
    int mg_SetNRelax(mg_Core core, int level, int nrelax)
    int mg_SetCycle(mg_Core core, int cycle)
    int mg_SetSkip(mg_Core core, int skip)
    int mg_SetAbsTol(mg_Core core, double atol)
    int mg_SetRelTol(mg_Core core, double rtol)
    int mg_SetMaxIter(mg_Core core, int max_iter)
    int mg_SetTemporalNorm(mg_Core core, int tnorm)
    int mg_SetStoreAll(mg_Core core, int store_all)
    int mg_SetReverse(mg_Core core, int reverse)
    int mg_SetWarmStart(mg_Core core, int warm)
    int mg_SetStepCost(mg_Core core, int level, double cost)
    int mg_SetLatency(mg_Core core, double latency)
    int mg_SetFinalSweep(mg_Core core, int final_sweep)
    int mg_SetTimeout(mg_Core core, double seconds)
    int mg_SetWait(mg_Core core, int wait)
    int mg_SetMaxCount(mg_Core core, int64_t max_count)

    int mg_GetNumIter(mg_Core core, int *iter_out)
    int mg_GetNumLevels(mg_Core core, int *nlevels_out)
    int mg_GetResidualNorms(mg_Core core, double *norms, int max, int *n_out)
    int mg_GetLocalRange(mg_Core core, int level, int64_t *lo, int64_t *hi)
    int mg_GetLevelSize(mg_Core core, int level, int64_t *n, int64_t *stride)
    int mg_GetVector(mg_Core core, int64_t index, mg_Vector *u_out)
    int mg_IsStored(mg_Core core, int64_t index, int *stored_out)
    int mg_SetVector(mg_Core core, int64_t index, mg_Vector u)
    int mg_GetStats(mg_Core core, int reduce, mg_Stats *stats_out)
    int mg_GetFailure(mg_Core core, int *rank_out, int64_t *index_out)
    int mg_GetFailureCode(mg_Core core, int *code_out)
    int mg_GetRank(mg_Core core, int *rank_out)

    const char *mg_ErrorString(int code)
    int mg_MPICudaSupport()
    int mg_BlockRange(int64_t N, int P, int q, int64_t *lo, int64_t *hi)
    int mg_LayerOwner(int64_t N, int P, int64_t n, int *owner)
    int mg_Hierarchy(int64_t nsteps, int max_levels, int64_t min_coarse, const int *cfactor,
                     int ncfactor, int *nlevels, int64_t *n, int64_t *stride)
    int mg_CheckApp(mg_App app, const mg_Ops *ops, double t, char *msg, size_t msglen) nogil
