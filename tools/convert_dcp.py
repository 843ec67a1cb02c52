"""Make a folder of sharded (FSDP) snapshots one ordinary file, on one machine, without a process group.

    python tools/convert_dcp.py snapshot.dcp model.pt         # step 6, fsdp.py
    python tools/convert_dcp.py gpt.dcp gpt_model.pt          # minGPT with trainer_config.strategy=fsdp (its best folder too)

The folder's pointer file (latest.pt) names its newest complete snapshot; torch's own converter,
torch.distributed.checkpoint.format_utils.dcp_to_torch_save, joins every rank's shards into whole
tensors. The file written holds the model (MODEL_STATE) and the pointer's values (the epochs done;
minGPT's VOCAB and CONFIG, so mingpt/sample.py can rebuild it), not the optimizer's state: it is for
using the model, as tools/predict.py and mingpt/sample.py do. Training resumes from the folder.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository root holds support/

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save  # noqa: E402
from torch.distributed.checkpoint.metadata import BytesStorageMetadata  # noqa: E402

from support import cli, snapshots  # noqa: E402


def newest_folder(path: str) -> tuple[str, dict[str, Any]]:
    """The snapshot folder the pointer of `path` names, and the pointer's values; anything else ends in one line."""
    pointer = os.path.join(path, snapshots.POINTER)
    if not os.path.isfile(pointer):
        cli.fail(f"{path} has no {snapshots.POINTER}: not a folder of sharded snapshots (fsdp.py's --snapshot_path, minGPT's with strategy=fsdp)")
    try:
        values = snapshots.read_or_raise(pointer, "cpu", required_keys=("FOLDER",))
    except snapshots.SnapshotError as err:
        cli.fail(str(err).removesuffix(f"; {snapshots.start_afresh(pointer)}"))
    name = values.pop("FOLDER")
    if not (isinstance(name, str) and snapshots.SHARDED_NAME.fullmatch(name) and os.path.isdir(os.path.join(path, name))):
        cli.fail(f"{pointer} names no snapshot folder of {path} ({name!r})")
    return os.path.join(path, name), values


def check_values(folder: str) -> None:
    """Fail unless every value of the snapshot that is not a tensor unpickles with weights_only=True.

    dcp_to_torch_save unpickles them (the optimizer's settings, say) with weights_only=False, which would
    run code planted in a snapshot. So they are read first through the steps' planner, which refuses that.
    """
    metadata = dcp.FileSystemReader(folder).read_metadata()  # .metadata passed check_metadata: DCP's classes only
    values = {key: None for key, item in metadata.state_dict_metadata.items() if isinstance(item, BytesStorageMetadata)}
    planner = snapshots.weights_only_load_planner()
    try:
        with warnings.catch_warnings():  # without a process group: "assuming the intent is to load in a single process", as it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(values, checkpoint_id=folder, planner=planner)
    except dcp.CheckpointException as err:
        if planner.refused:
            cli.fail(f"{folder} holds {planner.refused}, a pickle that could run code when loaded, so it was not converted")
        cli.fail(f"{folder} is not a readable snapshot ({cli.brief(next(iter(err.failures.values()))[0])})")


def convert(path: str, output: str) -> None:
    folder, values = newest_folder(path)
    try:  # its .metadata is unpickled without restriction by DCP: refuse a planted one first
        snapshots.check_metadata(folder, path)
    except snapshots.SnapshotError as err:  # said without the advice for a resume: this folder is only read
        cli.fail(str(err).removesuffix(f"; {snapshots.start_afresh(path)}"))
    check_values(folder)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(output))) as scratch:
        whole = os.path.join(scratch, "whole.pt")
        try:
            dcp_to_torch_save(folder, whole)
        except Exception as err:  # a shard missing or damaged: DCP's CheckpointException, or the reader's own error
            cli.fail(f"{folder} is not a readable snapshot ({cli.brief(err)})")
        model = torch.load(whole, map_location="cpu", weights_only=True).get("MODEL_STATE")
    if not model:
        cli.fail(f"{folder} holds no MODEL_STATE: not a snapshot fsdp.py or minGPT wrote")
    snapshots.atomic_save({"MODEL_STATE": model, **values}, output)
    print(f"{folder} -> {output}: the model, {len(model)} tensors of {sum(tensor.numel() for tensor in model.values()):,} numbers", flush=True)


if __name__ == "__main__":
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("folder", help="the folder of sharded snapshots (fsdp.py's snapshot.dcp; minGPT's trainer_config.snapshot_path)")
    parser.add_argument("output", help="the file to write; an existing one is left as it is")

    def new_file(args: argparse.Namespace) -> str | None:
        return f"{args.output} exists; pass a new file name (or remove it)" if os.path.exists(args.output) else None

    parser.checks.append(new_file)
    args = parser.parse_args()
    snapshots.check_writable_folder(args.output)
    convert(args.folder, args.output)
