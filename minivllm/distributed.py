"""The tensor-parallel process group: this rank's place in it, the collectives the layers
use, and the control channel on which rank 0 sends each step's call to the other ranks.

A process is a rank of at most one group at a time: the layers read ``tp_rank``/``tp_size``
when they are built.
"""
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

# A collective waiting longer than this has lost a peer: fail rather than hang. (Spawned workers
# are watched more closely, see minivllm.heartbeat; ranks that torchrun launched are its to watch.)
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
# The other ranks wait on the control channel for rank 0's next call however long the engine
# idles. This is no hang: a rank 0 that dies closes its sockets, which ends the wait at once.
IDLE_TIMEOUT = timedelta(days=365)
TORCHRUN_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")

_control = None  # a gloo group: the calls are pickled objects, and the default group may be NCCL


def tp_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def tp_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce(x):
    if tp_size() > 1:
        dist.all_reduce(x)
    return x


def min_over_ranks(value: int, device: torch.device) -> int:
    if tp_size() == 1:
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def torchrun_rank() -> int | None:
    """This process's rank when a launcher such as torchrun set the standard environment."""
    return int(os.environ["RANK"]) if all(k in os.environ for k in TORCHRUN_ENV) else None


def local_init_method() -> str:
    """A rendezvous address on this host for spawned ranks, on a port free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def init(rank: int, world_size: int, device: str, init_method: str = "env://"):
    """Joins the group: NCCL between GPUs (one per rank), gloo between CPU processes."""
    global _control
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=init_method, rank=rank,
                            world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    _control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


def broadcast_call(call=None):
    """Rank 0 passes ``(method name, args)``; every rank gets it back."""
    box = [call]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


def destroy():
    global _control
    if dist.is_initialized():
        dist.destroy_process_group()
    _control = None
