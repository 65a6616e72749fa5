"""How a tensor becomes a message.

Two paths, chosen by ``kind``:

* ``"host"``: staged through host memory.  The MGRIT solvers pack a state
  into message buffers they keep from solve to solve (core-owned on a
  machine without CUDA; pinned host tensors where CUDA is available); the
  other senders (ghost weights, the pipeline's micro-batches) copy into
  host buffers (pinned where CUDA is available) that the network's
  ``Transport`` keeps between messages and passes.
* ``"device"``: the tensor's own memory goes to MPI (mpi4py reads any
  tensor through DLPack, CUDA memory included; the solvers' buffers are
  tensors on the state's device, and each message's header travels apart;
  the pipeline's buffers are tensors on the state's device too, its header
  inside the message).  It needs an MPI library that reads device memory.

``"auto"`` is ``"device"`` when the MPI library reports CUDA support and
CUDA is available, else ``"host"``.  Before MPI reads a buffer that a CUDA
kernel wrote, the current stream is synchronised (``ready``).

No message makes a buffer of its own.  A sender with one message of a kind
in flight at a time (the ghosts' weights) keeps one buffer per peer and
purpose (``Transport.buffer``), regrown only when a message outgrows it;
one with several (the pipeline: a message per micro-batch, receives posted
ahead) takes them from a ``BufferPool`` per peer and purpose, and gives each
back when its message is done with (a send completed, a receive read), so
that the pool holds as many buffers as there were messages in flight at
once.  ``Transport.allocations`` counts every buffer made: after the first
pass of a given shape, none.

Either path gives the same bytes: on CPU both run, and the results are
bitwise the same (tests/test_transport.py).
"""
import heapq

import torch

from braid_ext import mpi_cuda_support

KINDS = ("auto", "host", "device")


def resolve(kind):
    """``"host"`` or ``"device"`` for the option ``kind``."""
    if kind not in KINDS:
        raise ValueError(f"transport={kind!r}: choose one of {', '.join(KINDS)}")
    if kind != "auto":
        return kind
    return "device" if torch.cuda.is_available() and mpi_cuda_support() else "host"


def ready(device):
    """Wait until the kernels queued on ``device``'s current stream are done
    (a buffer they write is then complete for MPI to read)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def as_bytes(t):
    """A contiguous tensor's memory as a flat uint8 tensor (no copy): what
    MPI is handed on the device path (any dtype, bfloat16 included)."""
    return t.reshape(-1).view(torch.uint8)


def byte_buffer(nbytes, where):
    """A new uint8 tensor of ``nbytes`` (at least 1) on device ``where``,
    pinned when it is host memory and CUDA is available."""
    pin = where.type == "cpu" and torch.cuda.is_available()
    return torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device=where, pin_memory=pin)


class Transport:
    """The message path of one network (``kind``: an entry of ``KINDS``),
    with the buffers it keeps for the senders outside the solvers."""

    def __init__(self, kind="auto"):
        self.option = kind
        self.kind = resolve(kind)
        self._kept = {}  # key (purpose, peer[, slot]) -> a buffer kept between messages
        self._pools = {}  # (purpose, peer) -> its BufferPool
        self.allocations = 0  # buffers made so far (host or device)

    @property
    def device_direct(self):
        return self.kind == "device"

    def buffer(self, key, nbytes, device):
        """A byte buffer of at least ``nbytes`` for messages of ``key``
        ((purpose, peer), and a slot in a pool), kept for the next message
        of that key: on the device path on ``device``, else in host memory
        (pinned where CUDA is available).  The caller uses ``[:nbytes]`` of
        it."""
        buf = self._kept.get(key)
        where = torch.device(device) if self.device_direct else torch.device("cpu")
        if buf is None or buf.numel() < nbytes or buf.device != where:
            buf = self._kept[key] = byte_buffer(nbytes, where)
            self.allocations += 1
        return buf

    def handle(self, buf):
        """What to hand to mpi4py for the byte buffer ``buf`` (one of this
        transport's): the tensor itself on the device path (DLPack), else a
        numpy view of its host memory."""
        return buf if self.device_direct else buf.numpy()

    def pool(self, key):
        """The ``BufferPool`` of messages of ``key`` ((purpose, peer)), kept
        for the transport's life."""
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = BufferPool(self, key)
        return pool

    def pool_sizes(self):
        """{key: buffers} of every pool: the most messages of each that were
        in flight at once."""
        return {key: pool.slots for key, pool in self._pools.items()}

    def message(self, parts, key):
        """What to hand to mpi4py to send the bytes of the tensors ``parts``
        one after the other: on the device path their own bytes (joined into
        one tensor when there are several), else a copy of each straight into
        the host buffer of ``key`` (a numpy view).  What is returned must stay
        untouched until the send completes."""
        raw = [as_bytes(t.detach().contiguous()) for t in parts]
        if self.device_direct:
            flat = raw[0] if len(raw) == 1 else torch.cat(raw)
            ready(flat.device)
            return flat
        nbytes = sum(r.numel() for r in raw)
        buf = self.buffer(key, nbytes, "cpu")[:nbytes]
        at = 0
        for r in raw:
            buf[at:at + r.numel()].copy_(r)
            at += r.numel()
        return buf.numpy()

    def receive_buffer(self, nbytes, device, key):
        """Where a message of ``nbytes`` lands: (what to hand to mpi4py, the
        uint8 tensor holding it)."""
        buf = self.buffer(key, nbytes, device)[:nbytes]
        return self.handle(buf), buf


class BufferPool:
    """The buffers of one peer and purpose's messages in flight at once.

    ``take`` hands out the free buffer of the lowest slot (a slot's buffer
    is ``transport.buffer(key + (slot,))``: made, or regrown, only when it
    is too small), or a new slot when every buffer is in flight; ``give``
    returns a slot once its message is done with.  A slot never given back
    (a pass left by an exception while its message was pending) is never
    handed out again, so MPI never writes into a buffer in use."""

    def __init__(self, transport, key):
        self.transport, self.key = transport, tuple(key)
        self._free = []  # a heap of free slots
        self.slots = 0   # slots made so far: the most messages in flight at once

    def take(self, nbytes, device):
        """(slot, a uint8 tensor of ``nbytes``): a buffer no message uses."""
        if self._free:
            slot = heapq.heappop(self._free)
        else:
            slot, self.slots = self.slots, self.slots + 1
        return slot, self.transport.buffer(self.key + (slot,), nbytes, device)[:nbytes]

    def give(self, slot):
        """Slot ``slot``'s message is done with: its buffer may be taken again."""
        heapq.heappush(self._free, slot)

