"""Snapshot files, written and read safely.

A snapshot is everything needed to continue training as if nothing had happened. It is written
atomically (a kill at any moment leaves the old file or the new one), read with
`weights_only=True` (a planted pickle is refused, never run), and checked before use; a file
that cannot be used is reported in one line and left untouched.

FSDP's snapshots are sharded (torch.distributed.checkpoint, DCP): a folder in which every rank
writes its own shards. They keep the same promises: each is written into a new folder, and a small
pointer file, replaced atomically once every rank has finished, names the newest complete one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import glob
import io
import os
import pickle
import re
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any, Callable

import torch
import torch.distributed as dist

from support import cli

# torch.distributed.checkpoint (DCP) and torch.distributed.fsdp, for FSDP's sharded snapshots, are imported
# where they are used: they take a second or more to import, which the steps that do not use them need not wait for.

SNAPSHOT_KEYS = ("MODEL_STATE", "OPTIMIZER_STATE", "EPOCHS_RUN")
PAUSE_AT = "SNAPSHOT_PAUSE_AT"  # for tests: "POINT@RANK" stops that rank at that point of a save, to be killed there
POINTER = "latest.pt"  # in a folder of sharded snapshots: names the newest complete one
SHARDED_NAME = re.compile(r"(epoch|step)-\d+")  # the sharded snapshots in that folder: epoch-0030, step-00000123, ...
SHARDED_KEYS = ("MODEL_STATE", "OPTIMIZER_STATE")  # what a sharded snapshot shards; the rest is in its pointer
# What the .metadata file of a sharded snapshot may name when unpickled, besides DCP's own data
# classes and enums (see check_metadata); anything else could run code.
METADATA_GLOBALS = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
}  # fmt: skip


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
    flush it to disk, then rename it over the old file and sync the folder entry. Nodes that
    share the folder may write the same path at once (step 4: every node's local rank 0 saves
    its copy): each writes its own temporary file, named after its host and process, and every
    rename leaves a whole file. A temporary file of this host whose process is gone is the
    leftover of a writer killed mid-save, and is removed first.
    """
    folder = os.path.dirname(os.path.abspath(path))
    prefix = f"{os.path.basename(path)}.{socket.gethostname()}."
    for stale in glob.glob(os.path.join(glob.escape(folder), glob.escape(prefix) + "*.tmp")):
        if not process_alive(int(stale[len(os.path.join(folder, prefix)) :].split(".")[0])):
            os.remove(stale)
    fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=f"{prefix}{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp_file:
            torch.save(obj, tmp_file)
            tmp_file.flush()
            os.fsync(tmp_file.fileno())
        pause_point("temp-written")
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


def pause_point(point: str) -> None:
    """Where tests kill a save at an exact moment, whatever the machine's speed: with $SNAPSHOT_PAUSE_AT
    set to "POINT@RANK", that rank says it has reached the point and waits there to be killed."""
    if os.environ.get(PAUSE_AT) == f"{point}@{cli.rank_in('job')}":
        print(f"paused at {point}", flush=True)
        while True:
            time.sleep(1)


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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
                f"{path} holds Python objects other than tensors, which could run code when loaded, so it was not loaded; {start_afresh(path)}"
            ) from None
        raise SnapshotError(f"{path} is not a readable snapshot (damaged, or not written by torch.save); {start_afresh(path)}") from None
    except Exception as err:  # corrupt, truncated or not a torch file at all
        raise SnapshotError(f"{path} is not a readable snapshot ({cli.brief(err)}); {start_afresh(path)}") from None
    if not isinstance(snapshot, dict) or not all(key in snapshot for key in required_keys):
        raise SnapshotError(f"{path} is not a snapshot of this program (expected keys {', '.join(required_keys)}); {start_afresh(path)}")
    return snapshot


def kept(path: str) -> str:
    """What the file (or sharded snapshot folder) at `path` keeps now, in words, for the line of a stopped job."""
    file = os.path.join(path, POINTER) if os.path.isdir(path) else path
    if not os.path.exists(file):
        return f"nothing is saved yet ({path}); the same command starts afresh"
    try:  # mmap: only the few values read come off the disk, not the whole model
        saved = torch.load(file, map_location="cpu", weights_only=True, mmap=not os.path.isdir(path))
    except Exception:
        return f"{path} cannot be read"
    if not isinstance(saved, dict) or "EPOCHS_RUN" not in saved:  # steps 1 and 2: the weights alone
        return f"{path} keeps the weights saved last (its line is above); this step does not resume, step 3 does"
    done = cli.plural(saved["EPOCHS_RUN"], "epoch") + (f" + {saved['WINDOWS_DONE']:,} windows" if saved.get("WINDOWS_DONE") else "")
    return f"{path} keeps {done}; the same command resumes from there"


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` was sharded by FSDP (fully_shard), without importing FSDP where no script did."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


@contextlib.contextmanager
def mismatch_reported(path: str) -> Iterator[None]:
    """Around load_state_dict: a snapshot of another model or optimizer ends the job in one line."""
    try:
        yield
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        cli.fail(f"{path} was saved from a different model or optimizer ({cli.brief(err)}); {start_afresh(path)}")


def note_global_batch(snapshot: dict[str, Any], batch: int) -> None:
    """One line when a resume changes the global batch (processes x per-process batch) that `snapshot` trained with."""
    old_world, old_batch, world = snapshot["WORLD_SIZE"], snapshot["BATCH_SIZE"], dist.get_world_size()
    if old_world * old_batch == world * batch:
        return
    keep, remainder = divmod(old_world * old_batch, world)
    how = f"--batch_size {keep} keeps it" if not remainder else f"no --batch_size keeps it on {world} processes"
    print(
        f"Note: the global batch changed from {old_world * old_batch} ({old_world} process{'es' * (old_world > 1)} x {old_batch}) "
        f"to {world * batch} ({world} x {batch}); {how}",
        flush=True,
    )


def ranks_seen(folder: str, prefix: str, leave_marker: bool) -> list[int]:
    """Collective: the ranks whose marker file this rank sees in `folder`; each rank with `leave_marker` leaves one.

    A marker has a name no earlier run used; every rank has looked before any marker is removed.
    """
    mine = f"{prefix}{uuid.uuid4().hex}.marker" if leave_marker else None
    if mine:
        open(os.path.join(folder, mine), "w").close()
    markers: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(markers, mine)
    seen = [rank for rank, marker in enumerate(markers) if marker and os.path.exists(os.path.join(folder, marker))]
    dist.barrier()
    if mine:
        os.remove(os.path.join(folder, mine))
    return seen


def newest_copy(
    path: str, progress: Callable[[dict[str, Any]], Any] = lambda copy: copy["EPOCHS_RUN"], required_keys: tuple[str, ...] = SNAPSHOT_KEYS
) -> dict[str, Any] | None:
    """Collective: the newest of the snapshot copies the nodes hold at `path`, on every rank; None if none has one.

    Nodes share no files: the local rank 0 of each node writes its own copy. At start its copy
    may be missing (a node replaced) or older (a node that was down), so each node's local rank 0
    reads its own (all_gather_object tells every rank how far each copy got, by `progress`), and
    the rank holding the newest sends it to all (broadcast_object_list). A copy that cannot be
    read ends the job, naming the node. On the CPU: a tensor sent as an object arrives on the
    device it was sent from; load_state_dict copies it where the model is.
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


def check_shared_folder(path: str) -> None:
    """Collective: make the snapshot folder `path`, and fail unless every rank sees the files every other rank writes in it.

    A sharded snapshot has a part from every rank, and a resume (on any number of processes) reads
    pieces of every part, so all nodes must reach one folder: shared storage. Each rank leaves a
    marker there; a rank that misses another's is on a node that sees another folder by that name.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        cli.fail(f"{path} is a file, but FSDP's sharded snapshots are folders; pass another --snapshot_path", scope="node")
    os.makedirs(path, exist_ok=True)
    missing = sorted(set(range(dist.get_world_size())) - set(ranks_seen(path, ".rank-", leave_marker=True)))
    views: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(views, (socket.gethostname(), missing))
    blind = [rank for rank, (_, missed) in enumerate(views) if missed]
    if blind:
        node, missed = views[blind[0]]
        cli.fail(
            f"{path} is not shared: rank {blind[0]} on node {node} does not see the files of rank{'s' * (len(missed) > 1)} "
            f"{', '.join(map(str, missed))} there. Every rank writes part of each snapshot and may read any other's: "
            "put --snapshot_path on storage every node mounts (NFS, Lustre, ...), at the same path",
            reporter=dist.get_rank() == blind[0],
        )


@contextlib.contextmanager
def published_when_complete(path: str, name: str, snapshot: dict[str, Any]) -> Iterator[str]:
    """Collective, around dcp.save: the new folder `name` in `path` to save the shards into; once every
    rank has, the pointer file names it, so that a kill at any moment leaves a usable snapshot.

    Before: rank 0 empties the folder (left by a save that was killed). After every rank's shards
    are written: rank 0 replaces the pointer (atomic_save), which names the folder and holds the
    snapshot's small values (epochs, settings; the same on every rank), then removes the older
    folders. Until then the pointer names the previous snapshot, which is left whole. A SIGTERM
    that DCP caught mid-save (as a CheckpointException) ends the process as SIGTERM does elsewhere.
    """
    import torch.distributed.checkpoint as dcp

    assert SHARDED_NAME.fullmatch(name), name
    folder = os.path.join(path, name)
    if dist.get_rank() == 0 and os.path.exists(folder):
        shutil.rmtree(folder)
    dist.barrier()  # removed before anyone writes there
    try:
        yield folder
    except dcp.CheckpointException as err:
        raise_exit(err)
        raise
    pause_point("shards-written")
    dist.barrier()  # every rank's shards are written (and rank 0's .metadata, which lists them)
    if dist.get_rank() == 0:
        atomic_save({"FOLDER": name, **{key: value for key, value in snapshot.items() if key not in SHARDED_KEYS}}, os.path.join(path, POINTER))
        pause_point("pointer-replaced")
        for old in os.listdir(path):
            if SHARDED_NAME.fullmatch(old) and old != name:
                shutil.rmtree(os.path.join(path, old))


def read_pointer(path: str, required_keys: tuple[str, ...] = ("EPOCHS_RUN",)) -> dict[str, Any] | None:
    """Collective: the pointer file of the sharded snapshots in folder `path` (the newest one's folder and its
    small values), read by rank 0 and sent to all; None if there is none. An unusable one ends the job in one line."""
    choice: list[Any] = [(None, None)]  # (the pointer, or an error)
    pointer = os.path.join(path, POINTER)
    if dist.get_rank() == 0 and os.path.exists(pointer):
        try:
            choice = [(read_or_raise(pointer, "cpu", required_keys=("FOLDER", *required_keys)), None)]
        except SnapshotError as err:
            choice = [(None, str(err))]
        name = choice[0][0] and choice[0][0]["FOLDER"]
        if name is not None and not (isinstance(name, str) and SHARDED_NAME.fullmatch(name)):
            choice = [(None, f"{pointer} names no snapshot folder ({name!r}); {start_afresh(path)}")]
    dist.broadcast_object_list(choice, src=0)  # every rank reads the same snapshot, whatever its file system caches
    found, error = choice[0]
    if error:
        cli.fail(error)
    return found


@contextlib.contextmanager
def checked_dcp_load(folder: str, path: str) -> Iterator[Any]:
    """Collective, around dcp.load from `folder`: its .metadata checked first, and a planner that unpickles
    tensors and plain values only; anything that is not such a snapshot of this model ends the job in one
    line, and is left untouched."""
    import torch.distributed.checkpoint as dcp

    try:
        check_metadata(folder, path)
    except SnapshotError as err:
        cli.fail(str(err))
    planner = weights_only_load_planner()
    try:
        yield planner
    except dcp.CheckpointException as err:  # missing or damaged files, or another model's snapshot: raised on every rank
        raise_exit(err)
        if planner.refused:
            cli.fail(f"{folder} holds {planner.refused}, a pickle that could run code when loaded, so it was not loaded; {start_afresh(path)}")
        failure = next(iter(err.failures.values()))[0]
        cli.fail(f"{folder} is not a readable snapshot of this model ({cli.brief(failure)}); {start_afresh(path)}")


def raise_exit(err: Any) -> None:
    """Raise the SystemExit (SIGTERM: see the steps' main) that DCP turned into a CheckpointException, if it did, on any rank."""
    for failure, _ in err.failures.values():
        if isinstance(failure, SystemExit):
            raise failure from None


def check_metadata(folder: str, path: str) -> None:
    """Raise a SnapshotError unless `folder`/.metadata unpickles to DCP's metadata alone.

    dcp.load unpickles it with no restriction: a planted one could run code. So it is first read
    with an unpickler that knows only the classes DCP's metadata is made of.
    """

    class Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            found = super().find_class(module, name) if module.startswith("torch.distributed.checkpoint.") else None
            ours = dataclasses.is_dataclass(found) or (isinstance(found, type) and issubclass(found, enum.Enum))
            is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
            if not (ours or is_dtype or (module, name) in METADATA_GLOBALS):
                raise SnapshotError(
                    f"{folder}/.metadata names {module}.{name}, which could run code when loaded, so it was not loaded; {start_afresh(path)}"
                )
            return super().find_class(module, name)

    try:
        with open(os.path.join(folder, ".metadata"), "rb") as file:
            Restricted(file).load()
    except SnapshotError:
        raise
    except Exception as err:  # missing, truncated, not a pickle
        raise SnapshotError(f"{folder} is not a readable snapshot ({cli.brief(err)}); {start_afresh(path)}") from None


def weights_only_load_planner() -> Any:
    """dcp.load's planner, except that the values that are not tensors are unpickled with weights_only=True.

    DCP keeps such values (epochs, the optimizer's settings) as pickles, and loads them with
    weights_only=False, which would run code planted in a snapshot.
    """
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
        refused: str | None = None  # the key of a value refused

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            try:
                torch.load(value, weights_only=True)
            except pickle.UnpicklingError:
                self.refused = read_item.dest_index.fqn
                raise
            value.seek(0)
            super().load_bytes(read_item, value)

    return WeightsOnlyLoadPlanner()


# What wrapping a model adds to the names of its weights: DDP (and DataParallel) `module.`, torch.compile `_orig_mod.`.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def read_weights(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """For use, not for resuming: the model's weights in a file the series saved, and the whole file, onto the CPU.

    A bare state_dict (steps 1-2), or a snapshot's MODEL_STATE (steps 3-4 and any node's copy, minGPT's, an FSDP
    snapshot made one file by tools/convert_dcp.py). Read as `read_or_raise` reads, with `weights_only=True` and
    the same messages, less their advice to start afresh, which is for training. The names lose the prefixes of
    wrappers (DDP's, torch.compile's, in any order), taken off only when every name has one: a model's own
    submodule called `module` keeps its name.
    """
    from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

    if os.path.isdir(path):
        raise SnapshotError(f"{path} is a folder of sharded (FSDP) snapshots; make it one file first: python tools/convert_dcp.py {path} model.pt")
    if not os.path.exists(path):
        raise SnapshotError(f"{path} not found; pass a file a training run saved (checkpoint.pt, snapshot.pt, gpt_snapshot.pt, ...)")
    try:
        saved = read_or_raise(path, "cpu", required_keys=())
    except SnapshotError as err:
        raise SnapshotError(str(err).removesuffix(f"; {start_afresh(path)}").replace(" (expected keys )", "")) from None
    weights = saved.get("MODEL_STATE", saved)
    if not isinstance(weights, dict) or not weights or not all(torch.is_tensor(value) for value in weights.values()):
        raise SnapshotError(f"{path} holds no model weights: neither a state_dict nor a snapshot with MODEL_STATE")
    while prefix := next((p for p in WRAPPER_PREFIXES if all(key.startswith(p) for key in weights)), None):
        consume_prefix_in_state_dict_if_present(weights, prefix)
    return weights, saved
