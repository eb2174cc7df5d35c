"""Distributed: several processes (GPUs, nodes) sharing one study through `torch.distributed`.

Every process runs the whole program (SPMD), as torchrun, SLURM and Lightning's own launcher start it.
`launch` starts or joins the process group through Lightning Fabric; after that, feature extraction
splits the images the cache lacks across processes (`agree` + `shard`), each process writes its share
into the cache, and `gather_cache` makes every process's cache complete, also when the cache folder
is not shared between nodes. Only global rank 0 writes reports. In a single process every helper is
a no-op, so nothing here costs anything unless several processes were asked for.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True in global rank 0 (and in a single process)."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def lightning_accelerator(device: str) -> tuple[str, object]:
    """The study's device string ('auto', 'cpu', 'cuda', 'cuda:1', 'mps') as Lightning accelerator + device index."""
    device = str(device or "auto")
    if device.startswith("cuda"):
        return "gpu", ([int(device.split(":")[1])] if ":" in device else None)
    return device, None


def wants_processes(devices, num_nodes: int, strategy: str) -> bool:
    """Whether these settings ask for more than one process."""
    if str(strategy).startswith(("ddp", "fsdp", "deepspeed")) or int(num_nodes) > 1:
        return True
    return str(devices) not in ("1", "auto", "None")


def launch(*, device: str = "auto", devices="1", num_nodes: int = 1, strategy: str = "auto") -> int:
    """Start (or, under torchrun/SLURM, join) the processes that `devices` x `num_nodes` ask for.

    Lightning Fabric picks the cluster environment: under torchrun or SLURM the processes exist and
    only the process group is set up; otherwise Lightning re-runs this command once per extra device.
    Returns the world size. The fine-tuning Trainer later reuses this process group.
    """
    if not wants_processes(devices, num_nodes, strategy) or is_distributed():
        return world_size()
    from lightning.fabric import Fabric

    accelerator, index = lightning_accelerator(device)
    fabric = Fabric(
        accelerator=accelerator,
        devices=index or parse_devices(devices),
        num_nodes=int(num_nodes),
        strategy="ddp" if strategy == "auto" else strategy,
    )
    fabric.launch()
    return world_size()


def parse_devices(devices):
    """'2' -> 2, 'auto' -> 'auto', '0,1' -> [0, 1] (Lightning's forms)."""
    text = str(devices)
    if "," in text:
        return [int(d) for d in text.split(",") if d.strip()]
    try:
        return int(text)
    except ValueError:
        return text


def agree(todo: dict) -> dict:
    """Rank 0's list of work, so that every process splits the same list (caches may differ in timing)."""
    if not is_distributed():
        return todo
    box = [list(todo.items()) if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return dict(box[0])


def shard(items: list) -> list:
    """This process's share: items[rank::world_size] (all of them in a single process)."""
    return items[rank() :: world_size()]


def gather_cache(cache, written: list[bytes], skipped: dict) -> None:
    """After every process wrote its share (`written`: the keys it computed): merge the skipped images and
    complete this process's cache.

    The cache indexes its folder's new chunks first and reads the other processes' features (enough when
    the folder is shared); features still missing, e.g. with a node-local cache folder on several nodes,
    are exchanged between processes and written locally.
    """
    if not is_distributed():
        return
    dist.barrier()
    cache.refresh()
    skips = _gather(dict(skipped))
    for other in skips:
        skipped.update(other)
    everyone = {k for part in _gather(list(written)) for k in part}
    have = cache.get_many(everyone)
    missing = len(everyone - set(have))
    flag = torch.tensor([missing], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(flag)
    if int(flag.item()) == 0:
        return
    parts = _gather([(k, have[k], cache.compute_seconds(k)) for k in written])
    new = [(k, f, s) for part in parts for k, f, s in part if k not in have]
    if new:
        cache.put(
            [k for k, _, _ in new], np.stack([f for _, f, _ in new]), seconds=float(np.nansum([s for _, _, s in new]))
        )


def _gather(obj) -> list:
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
