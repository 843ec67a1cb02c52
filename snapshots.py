"""Snapshot files, written and read safely.

A snapshot is everything needed to continue training as if nothing had happened. It is written
atomically (a kill at any moment leaves the old file or the new one), read with
`weights_only=True` (a planted pickle is refused, never run), and checked before use; a file
that cannot be used is reported in one line and left untouched.
"""

from __future__ import annotations

import glob
import os
import pickle
import socket
import tempfile
import uuid
from typing import Any, Callable

import torch
import torch.distributed as dist

import cli

SNAPSHOT_KEYS = ("MODEL_STATE", "OPTIMIZER_STATE", "EPOCHS_RUN")


class SnapshotError(Exception):
    """A snapshot file that cannot be used; the message says which file and what to do."""


def start_afresh(path: str) -> str:
    return f"move {path} away (or pass another --snapshot_path) to start from scratch"


def check_writable_folder(path: str) -> None:
    """Fail now, before any training, if `path` could not be written later.

    Under torchrun the local rank 0 of each node checks, for its node (it writes that node's copy).
    """
    if cli.rank_in("node") != 0:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        cli.fail(f"cannot save {path}: folder {folder} does not exist; create it or choose another path", scope="node")
    try:  # a real write: os.access says yes to root even on a read-only file system
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        cli.fail(f"cannot save {path}: folder {folder} is not writable ({err.strerror}); choose another path", scope="node")


def atomic_save(obj: Any, path: str) -> None:
    """torch.save `obj` to `path` so that a crash at any moment leaves the old file or the new one.

    Write a temporary file in the same folder (same file system, so the rename is atomic),
    flush it to disk, then rename it over the old file and sync the folder entry. One process
    writes each path, so temporary files of this path are leftovers of a writer that was killed
    mid-save, and are removed first.
    """
    folder = os.path.dirname(os.path.abspath(path))
    prefix = os.path.basename(path) + "."
    for stale in glob.glob(os.path.join(glob.escape(folder), glob.escape(prefix) + "*.tmp")):
        os.remove(stale)
    fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp_file:
            torch.save(obj, tmp_file)
            tmp_file.flush()
            os.fsync(tmp_file.fileno())
        os.replace(tmp_path, path)
    except BaseException:  # also on SIGTERM (SystemExit): never leave a half-written temp file
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read(path: str, map_location: str | torch.device, required_keys: tuple[str, ...] = SNAPSHOT_KEYS) -> dict[str, Any]:
    """Load a snapshot written by `atomic_save`; anything else ends the job with one line."""
    try:
        return read_or_raise(path, map_location, required_keys)
    except SnapshotError as err:
        cli.fail(str(err))


def read_or_raise(path: str, map_location: str | torch.device, required_keys: tuple[str, ...] = SNAPSHOT_KEYS) -> dict[str, Any]:
    """Load a snapshot written by `atomic_save`, refusing anything else with a SnapshotError.

    `weights_only=True` unpickles tensors and plain containers only: a planted pickle that
    would run code on load is rejected instead of executed.
    """
    try:
        snapshot = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" in str(err):  # the pickle names a function or class to call: refused
            raise SnapshotError(
                f"{path} holds Python objects other than tensors, which could run code when loaded, "
                f"so it was not loaded; {start_afresh(path)}"
            ) from None
        raise SnapshotError(f"{path} is not a readable snapshot (damaged, or not written by torch.save); {start_afresh(path)}") from None
    except Exception as err:  # corrupt, truncated or not a torch file at all
        raise SnapshotError(f"{path} is not a readable snapshot ({cli.brief(err)}); {start_afresh(path)}") from None
    if not isinstance(snapshot, dict) or not all(key in snapshot for key in required_keys):
        raise SnapshotError(f"{path} is not a snapshot of this program (expected keys {', '.join(required_keys)}); {start_afresh(path)}")
    return snapshot


def restore(snapshot: dict[str, Any], path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch_size: int = 0) -> int:
    """Copy a snapshot's states into `model` and `optimizer`; return the number of epochs it had run.

    With `batch_size` (per process), a resume on another number of processes says how the
    global batch changed, and which --batch_size would keep it.
    """
    try:
        model.load_state_dict(snapshot["MODEL_STATE"])
        optimizer.load_state_dict(snapshot["OPTIMIZER_STATE"])
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        cli.fail(f"{path} was saved from a different model or optimizer ({cli.brief(err)}); {start_afresh(path)}")
    if batch_size and "WORLD_SIZE" in snapshot and cli.is_rank_zero():
        note_global_batch(snapshot["WORLD_SIZE"], snapshot["BATCH_SIZE"], dist.get_world_size(), batch_size)
    return int(snapshot["EPOCHS_RUN"])


def note_global_batch(old_world: int, old_batch: int, world: int, batch: int) -> None:
    """One line when a resume changes the global batch (processes x per-process batch)."""
    if old_world * old_batch == world * batch:
        return
    keep = old_world * old_batch / world
    how = f"--batch_size {keep:g} keeps it" if keep == int(keep) else f"no --batch_size keeps it on {world} processes"
    print(
        f"Note: the global batch changed from {old_world} x {old_batch} = {old_world * old_batch} "
        f"to {world} x {batch} = {world * batch} processes x samples; {how}",
        flush=True,
    )


def writes_copy(path: str) -> bool:
    """Collective: whether this rank writes a copy of the snapshot at `path`.

    Every node keeps its own copy, written by its local rank 0, so that no node's loss loses the
    training. Where nodes share the folder (a cluster's shared storage), one copy is enough: only
    the lowest-ranked of the nodes that see the same folder writes. Each node finds out by leaving
    a marker file there and looking for the others' markers.
    """
    folder, name = os.path.split(os.path.abspath(path))
    mine = f".{name}.{uuid.uuid4().hex}.node" if cli.rank_in("node") == 0 else None  # a name no earlier run used
    if mine:
        open(os.path.join(folder, mine), "w").close()
    markers: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(markers, mine)
    sharing = [rank for rank, marker in enumerate(markers) if mine and marker and os.path.exists(os.path.join(folder, marker))]
    dist.barrier()  # every node has looked before any marker goes
    if mine:
        os.remove(os.path.join(folder, mine))
    return bool(mine) and min(sharing) == dist.get_rank()


def newest_copy(path: str, progress: Callable[[dict[str, Any]], Any], required_keys: tuple[str, ...] = SNAPSHOT_KEYS) -> dict[str, Any] | None:
    """Collective: the newest of the snapshot copies the nodes hold at `path`, on every rank; None if none has one.

    Nodes share no files: the local rank 0 of each node writes its own copy. At start its copy
    may be missing (a node replaced) or older (a node that was down), so each node's local rank 0
    reads its own, all ranks compare `progress(snapshot)`, and the rank holding the newest sends
    it to all. A copy that cannot be read ends the job, naming the node.
    """
    snapshot, mine = None, None  # mine: (progress, error) of this node's copy
    if cli.rank_in("node") == 0 and os.path.exists(path):
        try:  # onto the CPU: a tensor sent as an object would arrive on the sender's GPU
            snapshot = read_or_raise(path, "cpu", required_keys)
            mine = (progress(snapshot), None)
        except SnapshotError as err:
            mine = (None, f"on node {socket.gethostname()}: {err}")
    found: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(found, mine)
    errors = [error for _, error in filter(None, found)]
    if any(errors):
        cli.fail(next(filter(None, errors)))
    holders = [(copy[0], -rank) for rank, copy in enumerate(found) if copy is not None]
    if not holders:
        return None
    source = -max(holders)[1]  # the newest copy; of equals, the lowest rank's
    message = [snapshot]
    dist.broadcast_object_list(message, src=source)
    return message[0]
