/*
 * comm.c -- messages between time-neighbour ranks and the global agreements.
 *
 * A message carries one vector from the rank that owns point j to the rank
 * that owns point j+1 on the same level.  Its layout is a header of two
 * doubles, [failed flag, sender's virtual clock], followed by the packed
 * vector (with buffers the application owns, e.g. in device memory, the
 * header travels apart, on the level's tag + MG_MAX_LEVELS, and the payload
 * goes straight from the application's buffer).  Message buffers are kept
 * from solve to solve: none is allocated per message.  A rank that has
 * failed sends the header alone (flag 1): the
 * receiver learns of the failure, stops doing user work, and passes it on
 * in its own messages, so the schedule of messages never changes and no
 * rank waits for a message that will not come.
 */
#include <limits.h>
#include <math.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "mgrit_impl.h"

#define HEADER_BYTES (2 * sizeof(double))

/* Tags of the liveness protocol that names a silent rank after a timeout
 * (sweep messages use the level as their tag, always < MG_MAX_LEVELS, and
 * their separate headers the level + MG_MAX_LEVELS).
 * Every message of the core travels on core->comm, the core's own
 * duplicate of the solver's communicator (core.c), so no message of the
 * Python side (layerpar/_tags.py, which records these tags) can meet them. */
enum { TAG_PING = 1001, TAG_PONG = 1002, TAG_NOTICE = 1003 };
_Static_assert(TAG_PING >= 2 * MG_MAX_LEVELS, "liveness tags must lie above the sweep tags");

/* Send buffers of the liveness protocol: never modified, never freed. */
static const int one_int = 1;
static const double poison_head[2] = {1.0, 0.0};

static void nap(void) {
  struct timespec ts = {0, 20000}; /* 20 us: a wait with a deadline polls */
  nanosleep(&ts, NULL);
}

/* Answer every ping that has arrived (a rank that timed out asks who is
 * alive); a notice that another rank named a silent rank ends our wait too.
 * Returns 1 with *silent set when a notice has arrived. */
static int serve(mg_Core core, int *silent) {
  int flag = 0;
  MPI_Status st;
  for (;;) {
    MPI_Iprobe(MPI_ANY_SOURCE, TAG_PING, core->comm, &flag, &st);
    if (!flag) break;
    int x;
    MPI_Request r;
    MPI_Recv(&x, 1, MPI_INT, st.MPI_SOURCE, TAG_PING, core->comm, MPI_STATUS_IGNORE);
    /* pong back to the asking rank */
    MPI_Isend(&one_int, 1, MPI_INT, st.MPI_SOURCE, TAG_PONG, core->comm, &r);
    MPI_Request_free(&r);
  }
  MPI_Iprobe(MPI_ANY_SOURCE, TAG_NOTICE, core->comm, &flag, &st);
  if (!flag) return 0;
  MPI_Recv(silent, 1, MPI_INT, st.MPI_SOURCE, TAG_NOTICE, core->comm, MPI_STATUS_IGNORE);
  return 1;
}

/*
 * Our deadline has passed while waiting for peer (or, peer < 0, for a
 * collective).  Ask every other rank whether it is alive (ping); ranks that
 * wait with a deadline too answer at once (pong).  The lowest rank that has
 * not answered within the grace period is the silent one (the peer when all
 * answered); every other rank is told (notice) so that it ends its own wait
 * with the same verdict.  The communicator is left with
 * requests that may never complete: the solver cannot be used again.
 */
static int timed_out(mg_Core core, int peer) {
  int P = core->size, silent = -1;
  core->broken = 1;
  MPI_Request *req = malloc(2 * (size_t)P * sizeof(MPI_Request));
  int *ans = calloc((size_t)P, sizeof(int));
  if (req && ans) {
    for (int r = 0; r < P; r++) {
      req[r] = req[P + r] = MPI_REQUEST_NULL;
      if (r == core->rank) continue;
      MPI_Isend(&one_int, 1, MPI_INT, r, TAG_PING, core->comm, &req[P + r]);
      MPI_Irecv(&ans[r], 1, MPI_INT, r, TAG_PONG, core->comm, &req[r]);
    }
    double grace = core->timeout < 1.0 ? core->timeout : 1.0;
    double end = MPI_Wtime() + grace;
    int pending = P - 1, dummy;
    while (pending > 0 && MPI_Wtime() < end) {
      pending = 0;
      for (int r = 0; r < P; r++) {
        int done = 1;
        if (req[r] != MPI_REQUEST_NULL) MPI_Test(&req[r], &done, MPI_STATUS_IGNORE);
        if (!done) pending++;
      }
      serve(core, &dummy);
      nap();
    }
    for (int r = 0; r < P && silent < 0; r++)
      if (req[r] != MPI_REQUEST_NULL) silent = r;
    if (silent < 0) silent = peer;
    /* The verdict to every other rank: those waiting end their wait now,
     * those still working (or the silent one, should it wake) at their next
     * wait.  The int is left allocated: a send to a rank that never
     * receives it may stay pending. */
    int *verdict = malloc(sizeof(int));
    if (verdict) {
      *verdict = silent;
      for (int r = 0; r < P; r++) {
        if (r == core->rank) continue;
        MPI_Request n;
        MPI_Isend(verdict, 1, MPI_INT, r, TAG_NOTICE, core->comm, &n);
        MPI_Request_free(&n);
      }
    }
    for (int r = 0; r < P; r++) {
      if (req[r] != MPI_REQUEST_NULL) {
        MPI_Cancel(&req[r]);
        MPI_Wait(&req[r], MPI_STATUS_IGNORE);
      }
      if (req[P + r] != MPI_REQUEST_NULL) MPI_Request_free(&req[P + r]);
    }
  } else {
    silent = peer;
  }
  free(req);
  free(ans);
  core->fail_rank = silent;
  core->failed = MG_ERR_TIMEOUT;
  return MG_ERR_TIMEOUT;
}

/* A wait without a deadline that leaves the core to other ranks: test,
 * yield a few times, then nap from 4 us doubling to 1 ms. */
static int wait_sleeping(MPI_Request *req) {
  long nap_ns = 4000;
  for (int k = 0;; k++) {
    int done = 0;
    if (MPI_Test(req, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS) return MG_ERR_MPI;
    if (done) return MG_OK;
    if (k < 16) {
      sched_yield();
      continue;
    }
    struct timespec ts = {0, nap_ns};
    nanosleep(&ts, NULL);
    if (nap_ns < 1000000) nap_ns *= 2;
  }
}

/* Wait for one request: MPI_Wait (or the sleeping wait), or with a timeout,
 * polling until the deadline.  peer: the rank the request waits for, or -1
 * (collective). */
static int wait_for(mg_Core core, MPI_Request *req, int peer) {
  if (*req == MPI_REQUEST_NULL) return MG_OK;
  if (core->timeout <= 0) {
    if (core->wait == MG_WAIT_SLEEP) return wait_sleeping(req);
    return MPI_Wait(req, MPI_STATUS_IGNORE) == MPI_SUCCESS ? MG_OK : MG_ERR_MPI;
  }
  double deadline = MPI_Wtime() + core->timeout;
  for (long k = 0;; k++) {
    int done = 0, silent = -1;
    if (MPI_Test(req, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS) return MG_ERR_MPI;
    if (done) return MG_OK;
    if (serve(core, &silent)) {
      /* another rank has timed out and named the silent rank */
      core->broken = 1;
      core->fail_rank = silent;
      core->failed = MG_ERR_TIMEOUT;
      return MG_ERR_TIMEOUT;
    }
    if (MPI_Wtime() > deadline) return timed_out(core, peer);
    if (k > 1000) nap();
  }
}

/* MPI_Allreduce, with the solver's timeout when it has one (or the sleeping
 * wait). */
int mg_Allreduce(mg_Core core, const void *in, void *out, int count,
                 MPI_Datatype type, MPI_Op op) {
  if (core->size == 1) {
    /* a communicator of one: the result is the input */
    int bytes;
    MPI_Type_size(type, &bytes);
    if (out != in) memcpy(out, in, (size_t)count * (size_t)bytes);
    return MG_OK;
  }
  if (core->timeout <= 0 && core->wait == MG_WAIT_BUSY)
    return MPI_Allreduce(in, out, count, type, op, core->comm) == MPI_SUCCESS
               ? MG_OK : MG_ERR_MPI;
  MPI_Request req;
  if (MPI_Iallreduce(in, out, count, type, op, core->comm, &req) != MPI_SUCCESS)
    return MG_ERR_MPI;
  return wait_for(core, &req, -1);
}

/*
 * (datatype, count) of a message of n bytes: n MPI_BYTEs when n fits in one
 * MPI count (core->max_count), else one element of a derived type of q
 * blocks of max_count bytes and one of the rest (built once per size).  A
 * shorter message (a header alone, an empty payload) matches either, as a
 * prefix of its type signature.
 */
static int bytes_type(mg_Core core, size_t n, MPI_Datatype *type, int *count) {
  size_t chunk = (size_t)core->max_count;
  if (n <= chunk) {
    *type = MPI_BYTE;
    *count = (int)n;
    return MG_OK;
  }
  *count = 1;
  if (core->bigtype != MPI_DATATYPE_NULL && core->bigtype_bytes == n) {
    *type = core->bigtype;
    return MG_OK;
  }
  if (core->bigtype != MPI_DATATYPE_NULL) MPI_Type_free(&core->bigtype);
  core->bigtype_bytes = 0;
  MPI_Datatype block;
  size_t q = n / chunk, r = n % chunk;
  if (q > INT_MAX || MPI_Type_contiguous((int)chunk, MPI_BYTE, &block) != MPI_SUCCESS)
    return MG_ERR_MPI;
  int lens[2] = {(int)q, (int)r};
  MPI_Aint displs[2] = {0, (MPI_Aint)(q * chunk)};
  MPI_Datatype types[2] = {block, MPI_BYTE};
  int rc = MPI_Type_create_struct(r ? 2 : 1, lens, displs, types, &core->bigtype);
  MPI_Type_free(&block);
  if (rc != MPI_SUCCESS || MPI_Type_commit(&core->bigtype) != MPI_SUCCESS) {
    core->bigtype = MPI_DATATYPE_NULL;
    return MG_ERR_MPI;
  }
  core->bigtype_bytes = n;
  *type = core->bigtype;
  return MG_OK;
}

static int isend_bytes(mg_Core core, const void *data, size_t n, int dest, int tag,
                       MPI_Request *req) {
  MPI_Datatype type;
  int count;
  if (bytes_type(core, n, &type, &count) != MG_OK) return MG_ERR_MPI;
  return MPI_Isend(data, count, type, dest, tag, core->comm, req) == MPI_SUCCESS
             ? MG_OK : MG_ERR_MPI;
}

static int irecv_bytes(mg_Core core, void *data, size_t n, int source, int tag,
                       MPI_Request *req) {
  MPI_Datatype type;
  int count;
  if (bytes_type(core, n, &type, &count) != MG_OK) return MG_ERR_MPI;
  return MPI_Irecv(data, count, type, source, tag, core->comm, req) == MPI_SUCCESS
             ? MG_OK : MG_ERR_MPI;
}

/* A send buffer for the current message size: one kept from an earlier
 * send when there is one (too small ones are given back). */
static mg_Buf *take_buffer(mg_Core core) {
  size_t need = core->app_buffers ? core->bufsize : core->msgsize;
  while (core->freebufs) {
    mg_Buf *b = core->freebufs;
    core->freebufs = b->next;
    if (b->size >= need) return b;
    mg_BufDelete(core, b);
  }
  return mg_BufNew(core);
}

static void keep_buffer(mg_Core core, mg_Buf *b) {
  if (!b) return;
  b->next = core->freebufs;
  core->freebufs = b;
}

/* Every buffer the core keeps, given back (Destroy). */
void mg_FreeBuffers(mg_Core core) {
  while (core->freebufs) {
    mg_Buf *b = core->freebufs;
    core->freebufs = b->next;
    mg_BufDelete(core, b);
  }
  mg_BufDelete(core, core->rbuf);
  core->rbuf = NULL;
  core->rbufcap = 0;
  if (core->bigtype != MPI_DATATYPE_NULL) MPI_Type_free(&core->bigtype);
}

/* The receive buffer for the agreed message size: kept while it is large
 * enough (rbufcap is the same on every rank).  Records a failure. */
int mg_EnsureRecvBuffer(mg_Core core) {
  if (core->msgsize <= core->rbufcap) return MG_OK;
  mg_BufDelete(core, core->rbuf);
  core->rbuf = mg_BufNew(core);
  core->rbufcap = core->rbuf ? core->msgsize : 0;
  return core->rbuf ? MG_OK : MG_ERR_MEMORY;
}

/* Send u (may be NULL after a failure) to dest; completed by mg_WaitSends.
 * A rank that has failed (or fails to pack) sends the header alone (and,
 * when the header travels apart, an empty payload).  The buffer comes from
 * the core's free list: no allocation once the list holds enough. */
int mg_SendVector(mg_Core core, int dest, int tag, mg_Vector u) {
  if (core->nsends == core->capsends) {
    int cap = core->capsends ? 2 * core->capsends : 8;
    mg_Msg *s = realloc(core->sends, (size_t)cap * sizeof(mg_Msg));
    if (!s) {
      /* no slot to track a send: the poisoned header goes out blocking */
      mg_FailLocal(core, MG_ERR_MEMORY);
      int htag = core->app_buffers ? tag + MG_MAX_LEVELS : tag;
      if (MPI_Send(poison_head, 2, MPI_DOUBLE, dest, htag, core->comm) != MPI_SUCCESS)
        mg_FailLocal(core, MG_ERR_MPI);
      if (core->app_buffers &&
          MPI_Send(NULL, 0, MPI_BYTE, dest, tag, core->comm) != MPI_SUCCESS)
        mg_FailLocal(core, MG_ERR_MPI);
      return MG_OK;
    }
    core->sends = s;
    core->capsends = cap;
  }
  mg_Buf *b = core->failed ? NULL : take_buffer(core);
  char *payload = NULL;
  if (b) payload = core->app_buffers ? b->data : b->data + HEADER_BYTES;
  if (!core->failed) mg_CallPack(core, u, payload);
  /* a failed pack counts too: the header says so */
  double head[2] = {core->failed ? 1.0 : 0.0, core->clock};
  mg_Msg *m = &core->sends[core->nsends++];
  m->active = 1;
  m->buf = b;
  m->req = m->hreq = MPI_REQUEST_NULL;
  size_t n = core->failed ? 0 : core->bufsize;
  int rc;
  core->stats.messages++;
  core->stats.bytes += (int64_t)(HEADER_BYTES + n);
  if (core->app_buffers) {
    /* the header (host memory) on the payload's tag + MG_MAX_LEVELS, then
     * the payload, straight from the application's buffer */
    const double *h = poison_head;
    if (b) {
      memcpy(b->head, head, HEADER_BYTES);
      h = b->head;
    }
    rc = MPI_Isend(h, 2, MPI_DOUBLE, dest, tag + MG_MAX_LEVELS, core->comm, &m->hreq)
             == MPI_SUCCESS ? MG_OK : MG_ERR_MPI;
    if (rc == MG_OK)
      rc = isend_bytes(core, n ? (const void *)b->data : NULL, n, dest, tag, &m->req);
  } else if (b) {
    memcpy(b->data, head, HEADER_BYTES);
    rc = isend_bytes(core, b->data, HEADER_BYTES + n, dest, tag, &m->req);
  } else {
    rc = isend_bytes(core, poison_head, HEADER_BYTES, dest, tag, &m->req);
  }
  if (rc != MG_OK) mg_FailLocal(core, MG_ERR_MPI);
  return MG_OK;
}

/* Receives go into the solver's one receive buffer (a sweep has at most one
 * receive posted at a time). */
int mg_PostRecv(mg_Core core, int source, int tag, mg_Msg *msg) {
  msg->buf = NULL;
  msg->peer = source;
  msg->active = 1;
  msg->req = msg->hreq = MPI_REQUEST_NULL;
  mg_Buf *b = core->rbuf;
  int rc;
  if (core->app_buffers) {
    rc = MPI_Irecv(b->head, 2, MPI_DOUBLE, source, tag + MG_MAX_LEVELS, core->comm,
                   &msg->hreq) == MPI_SUCCESS ? MG_OK : MG_ERR_MPI;
    if (rc == MG_OK) rc = irecv_bytes(core, b->data, core->bufsize, source, tag, &msg->req);
  } else {
    rc = irecv_bytes(core, b->data, core->msgsize, source, tag, &msg->req);
  }
  if (rc != MG_OK) {
    mg_FailLocal(core, MG_ERR_MPI);
    msg->active = 0;
  }
  return MG_OK;
}

/* Wait for a posted receive; *u_out is a new vector, or NULL on failure. */
int mg_FinishRecv(mg_Core core, mg_Msg *msg, mg_Vector *u_out) {
  *u_out = NULL;
  if (!msg->active) return MG_OK;
  int rc = wait_for(core, &msg->hreq, msg->peer);
  if (rc == MG_OK) rc = wait_for(core, &msg->req, msg->peer);
  if (rc == MG_ERR_TIMEOUT) {
    MPI_Request *r[2] = {&msg->hreq, &msg->req};
    for (int k = 0; k < 2; k++) {
      if (*r[k] == MPI_REQUEST_NULL) continue;
      MPI_Cancel(r[k]);
      MPI_Request_free(r[k]);
    }
    /* the cancelled receive may still write into rbuf: keep it */
    core->rbuf = NULL;
    core->rbufcap = 0;
    return rc;
  }
  msg->active = 0;
  if (rc != MG_OK) {
    mg_FailLocal(core, MG_ERR_MPI);
    return MG_OK;
  }
  mg_Buf *b = core->rbuf;
  double head[2];
  memcpy(head, core->app_buffers ? (const char *)b->head : b->data, HEADER_BYTES);
  double arrival = head[1] + core->latency;
  if (arrival > core->clock) core->clock = arrival;
  if (head[0] != 0.0) {
    if (!core->failed) core->failed = MG_ERR_REMOTE;
  } else {
    *u_out = mg_CallUnpack(core, core->app_buffers ? b->data : b->data + HEADER_BYTES);
  }
  return MG_OK;
}

int mg_WaitSends(mg_Core core) {
  for (int k = 0; k < core->nsends; k++) {
    mg_Msg *m = &core->sends[k];
    if (m->active) {
      int rc = core->broken ? MG_ERR_TIMEOUT : wait_for(core, &m->hreq, -1);
      if (rc == MG_OK) rc = wait_for(core, &m->req, -1);
      if (rc == MG_ERR_TIMEOUT) {
        /* the receivers may never come: let the sends go on, keep their buffers */
        for (int i = k; i < core->nsends; i++) {
          mg_Msg *q = &core->sends[i];
          if (!q->active) continue;
          if (q->hreq != MPI_REQUEST_NULL) MPI_Request_free(&q->hreq);
          if (q->req != MPI_REQUEST_NULL) MPI_Request_free(&q->req);
        }
        core->nsends = 0;
        return MG_ERR_TIMEOUT;
      }
      if (rc != MG_OK) mg_FailLocal(core, MG_ERR_MPI);
    }
    keep_buffer(core, m->buf);
  }
  core->nsends = 0;
  return MG_OK;
}

static int ceil_log2(int p) {
  int k = 0;
  while ((1 << k) < p) k++;
  return k;
}

/*
 * Global agreement: every rank learns whether (and on which rank first) a
 * callback, an MPI call or an allocation failed, the clocks are synchronised
 * to their maximum plus the latency of a reduction tree, and the local
 * residual contributions are combined (sum of squares for the L2 norm,
 * maximum for the inf-norm), as is the first fine index with a non-finite
 * residual.  local < 0 skips the norm.
 */
int mg_AgreeNorm(mg_Core core, double local, int64_t bad, double *global,
                 int64_t *bad_global) {
  /* [(P - failing rank) * 16 + its error code, or 0; clock;
   *  N+1 - bad index or 0; inf-norm part]: the maximum names the lowest
   * failing rank and its code */
  double mx[4], gmx[4];
  int here = core->failed && core->failed != MG_ERR_REMOTE;
  mx[0] = here ? (double)(core->size - core->rank) * 16.0 + core->failed : 0.0;
  mx[1] = core->clock;
  mx[2] = bad >= 0 ? (double)(core->nsteps + 1 - bad) : 0.0;
  mx[3] = (core->tnorm == MG_TNORM_INF && local > 0) ? local : 0.0;
  MG_CHK(mg_Allreduce(core, mx, gmx, 4, MPI_DOUBLE, MPI_MAX));
  if (gmx[0] > 0) {
    int64_t code = (int64_t)gmx[0];
    core->fail_rank = core->size - (int)(code / 16);
    core->fail_code = (int)(code % 16);
    if (!here) core->failed = MG_ERR_REMOTE;
  }
  core->clock = gmx[1] + core->latency * ceil_log2(core->size);
  if (bad_global) *bad_global = gmx[2] > 0 ? core->nsteps + 1 - (int64_t)gmx[2] : -1;
  if (local < 0) return MG_OK;
  if (core->tnorm == MG_TNORM_INF) {
    *global = gmx[3];
  } else {
    double s = local * local, gs;
    MG_CHK(mg_Allreduce(core, &s, &gs, 1, MPI_DOUBLE, MPI_SUM));
    *global = sqrt(gs);
  }
  return MG_OK;
}

int mg_AgreeFailure(mg_Core core) {
  return mg_AgreeNorm(core, -1.0, -1, NULL, NULL);
}
