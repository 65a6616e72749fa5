"""How a tensor becomes a message.

Two paths, chosen by ``kind``:

* ``"host"``: staged through host memory.  The MGRIT solvers pack a state
  into message buffers they keep from solve to solve (core-owned on a
  machine without CUDA; pinned host tensors where CUDA is available); the
  other senders (ghost weights, the pipeline) copy into host buffers kept
  per peer and purpose, regrown only when a message outgrows them.
* ``"device"``: the tensor's own memory goes to MPI (mpi4py reads any
  tensor through DLPack, CUDA memory included; the solvers' buffers are
  tensors on the state's device, and each message's header travels apart).
  It needs an MPI library that reads device memory.

``"auto"`` is ``"device"`` when the MPI library reports CUDA support and
CUDA is available, else ``"host"``.  Before MPI reads a buffer that a CUDA
kernel wrote, the current stream is synchronised (``ready``).

Either path gives the same bytes: on CPU both run, and the results are
bitwise the same (tests/test_transport.py).
"""
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
    with the host buffers it keeps for the senders outside the solvers."""

    def __init__(self, kind="auto"):
        self.option = kind
        self.kind = resolve(kind)
        self._host = {}  # (peer, purpose) -> a host buffer kept between messages
        self.allocations = 0  # host or device buffers made so far

    @property
    def device_direct(self):
        return self.kind == "device"

    def buffer(self, key, nbytes, device):
        """A byte buffer of at least ``nbytes`` for messages of ``key``
        ((peer, purpose)), kept for the next message of that key: on the
        device path on ``device``, else in host memory (pinned where CUDA
        is available).  The caller uses ``[:nbytes]`` of it."""
        buf = self._host.get(key)
        where = torch.device(device) if self.device_direct else torch.device("cpu")
        if buf is None or buf.numel() < nbytes or buf.device != where:
            buf = self._host[key] = byte_buffer(nbytes, where)
            self.allocations += 1
        return buf

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
        return (buf if self.device_direct else buf.numpy()), buf

