/*
 * comm.c -- messages between time-neighbour ranks and the global agreements.
 *
 * A message carries one vector from the rank that owns point j to the rank
 * that owns point j+1 on the same level.  Its layout is a header of two
 * doubles, [failed flag, sender's virtual clock], followed by the packed
 * vector.  A rank that has failed sends the header alone (flag 1): the
 * receiver learns of the failure, stops doing user work, and passes it on
 * in its own messages, so the schedule of messages never changes and no
 * rank waits for a message that will not come.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "mgrit_impl.h"

#define HEADER_BYTES (2 * sizeof(double))

static int mpi_ok(int ierr) { return ierr == MPI_SUCCESS ? MG_OK : MG_ERR_MPI; }

/* Send u (may be NULL after a failure) to dest; completed by mg_WaitSends. */
int mg_SendVector(mg_Core core, int dest, int tag, mg_Vector u) {
  if (core->nsends == core->capsends) {
    int cap = core->capsends ? 2 * core->capsends : 8;
    mg_Msg *s = realloc(core->sends, (size_t)cap * sizeof(mg_Msg));
    if (!s) return MG_ERR_MEMORY;
    core->sends = s;
    core->capsends = cap;
  }
  char *buf = malloc(core->msgsize);
  if (!buf) return MG_ERR_MEMORY;
  double head[2];
  if (!core->failed) mg_CallPack(core, u, buf + HEADER_BYTES);
  head[0] = core->failed ? 1.0 : 0.0; /* a failed pack counts too */
  head[1] = core->clock;
  memcpy(buf, head, HEADER_BYTES);
  /* after a failure only the header is meaningful */
  int count = core->failed ? (int)HEADER_BYTES : (int)core->msgsize;
  mg_Msg *m = &core->sends[core->nsends++];
  m->buf = buf;
  m->active = 1;
  core->stats.messages++;
  core->stats.bytes += count;
  return mpi_ok(MPI_Isend(buf, count, MPI_BYTE, dest, tag, core->comm, &m->req));
}

int mg_PostRecv(mg_Core core, int source, int tag, mg_Msg *msg) {
  msg->buf = malloc(core->msgsize);
  if (!msg->buf) return MG_ERR_MEMORY;
  msg->active = 1;
  return mpi_ok(MPI_Irecv(msg->buf, (int)core->msgsize, MPI_BYTE, source, tag,
                          core->comm, &msg->req));
}

/* Wait for a posted receive; *u_out is a new vector, or NULL on failure. */
int mg_FinishRecv(mg_Core core, mg_Msg *msg, mg_Vector *u_out) {
  *u_out = NULL;
  if (!msg->active) return MG_OK;
  int ierr = MPI_Wait(&msg->req, MPI_STATUS_IGNORE);
  msg->active = 0;
  if (ierr != MPI_SUCCESS) {
    free(msg->buf);
    return MG_ERR_MPI;
  }
  double head[2];
  memcpy(head, msg->buf, HEADER_BYTES);
  double arrival = head[1] + core->latency;
  if (arrival > core->clock) core->clock = arrival;
  if (head[0] != 0.0) {
    if (!core->failed) core->failed = MG_ERR_REMOTE;
  } else {
    *u_out = mg_CallUnpack(core, msg->buf + HEADER_BYTES);
  }
  free(msg->buf);
  msg->buf = NULL;
  return MG_OK;
}

int mg_WaitSends(mg_Core core) {
  int rc = MG_OK;
  for (int k = 0; k < core->nsends; k++) {
    if (MPI_Wait(&core->sends[k].req, MPI_STATUS_IGNORE) != MPI_SUCCESS)
      rc = MG_ERR_MPI;
    free(core->sends[k].buf);
  }
  core->nsends = 0;
  return rc;
}

static int ceil_log2(int p) {
  int k = 0;
  while ((1 << k) < p) k++;
  return k;
}

/*
 * Global agreement: every rank learns whether (and on which rank first) a
 * callback failed, the clocks are synchronised to their maximum plus the
 * latency of a reduction tree, and the local residual contributions are
 * combined (sum of squares for the L2 norm, maximum for the inf-norm), as is
 * the first fine index with a non-finite residual.  local < 0 skips the norm.
 */
int mg_AgreeNorm(mg_Core core, double local, int64_t bad, double *global,
                 int64_t *bad_global) {
  /* [P - failing rank or 0, clock, N+1 - bad index or 0, inf-norm part] */
  double mx[4], gmx[4];
  mx[0] = core->failed == MG_ERR_CALLBACK ? (double)(core->size - core->rank) : 0.0;
  mx[1] = core->clock;
  mx[2] = bad >= 0 ? (double)(core->nsteps + 1 - bad) : 0.0;
  mx[3] = (core->tnorm == MG_TNORM_INF && local > 0) ? local : 0.0;
  MG_CHK(mpi_ok(MPI_Allreduce(mx, gmx, 4, MPI_DOUBLE, MPI_MAX, core->comm)));
  if (gmx[0] > 0) {
    core->fail_rank = core->size - (int)gmx[0];
    if (core->failed != MG_ERR_CALLBACK) core->failed = MG_ERR_REMOTE;
  }
  core->clock = gmx[1] + core->latency * ceil_log2(core->size);
  if (bad_global) *bad_global = gmx[2] > 0 ? core->nsteps + 1 - (int64_t)gmx[2] : -1;
  if (local < 0) return MG_OK;
  if (core->tnorm == MG_TNORM_INF) {
    *global = gmx[3];
  } else {
    double s = local * local, gs;
    MG_CHK(mpi_ok(MPI_Allreduce(&s, &gs, 1, MPI_DOUBLE, MPI_SUM, core->comm)));
    *global = sqrt(gs);
  }
  return MG_OK;
}

int mg_AgreeFailure(mg_Core core) {
  return mg_AgreeNorm(core, -1.0, -1, NULL, NULL);
}
