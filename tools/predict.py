"""Use what you trained: load a checkpoint on one device, without a process group, and predict.

    python tools/predict.py checkpoint.pt                     # what steps 1-2 save
    python tools/predict.py snapshot.pt                       # steps 3-4 (any node's copy)
    python tools/predict.py model.pt                          # step 6's snapshot.dcp, made one file by tools/convert_dcp.py
    python tools/predict.py gpt_snapshot.pt gpt_best.pt       # minGPT's, on the text it was trained on

For each file: the loss on the held-out data, as the training printed it after the epoch the file was
saved (`val loss`; minGPT's `test loss`), and a few predictions beside their targets. The file is read
onto the CPU with weights_only=True; the names lose DDP's `module.` and torch.compile's `_orig_mod.`.
On a GPU the numbers may differ from the training's in their last digits: the order of the sums differs
(and minGPT evaluated in bf16 where the GPU has it).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository root holds support/ and the models

import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from support import cli, snapshots  # noqa: E402
import datautils  # noqa: E402
from support.report import format_metrics  # noqa: E402

SHOWN = 3  # predictions printed beside their targets


@functools.cache
def held_out(workload: str, data_dir: str) -> tuple[Dataset, torch.nn.Module]:
    """The validation set and a fresh model of the steps' workload (the same for every file of one call)."""
    _, val_set, model, _ = datautils.load_train_objs(datautils.Workload(workload, data_dir))
    return val_set, model


def predict_step(path: str, weights: dict[str, torch.Tensor], args: argparse.Namespace, device: str) -> None:
    """A file of steps 1-6: the validation metrics as its epoch line printed them, and the first predictions."""
    val_set, model = held_out(args.workload, args.data_dir)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:  # missing, unexpected or misshapen weights
        cli.fail(f"{path} was not saved from the --workload {args.workload} model ({cli.brief(err)}); pass the --workload it was trained with")
    model.to(device)
    loader = DataLoader(val_set, batch_size=128, collate_fn=datautils.collate)  # as the steps evaluate: no shuffle, no drop
    val = datautils.metrics(datautils.evaluate(model, loader, device))
    print(f"{path}: {format_metrics(val)} on {len(val_set)} held-out samples", flush=True)
    inputs, targets = loader.collate_fn([val_set[i] for i in range(SHOWN)])
    with torch.no_grad():
        outputs = model.eval()(inputs.to(device)).cpu()
    classes = getattr(val_set, "classes", None)  # CIFAR-10's names; generated images have none
    for output, target in zip(outputs, targets):
        if target.dtype == torch.long:
            predicted, actual = (classes[label] if classes else f"class {label}" for label in (int(output.argmax()), int(target)))
            print(f"  predicted {predicted}, target {actual}")
        else:
            print(f"  predicted {output.item():.6f}, target {target.item():.6f}")


def predict_gpt(path: str, weights: dict[str, torch.Tensor], saved: dict[str, Any], args: argparse.Namespace, device: str) -> None:
    """A minGPT snapshot: the test loss as the training's epoch line printed it, and one window's next characters."""
    from mingpt.char_dataset import DataError, cached_path, decode, is_url, read_text, split_datasets
    from mingpt.config import DataConfig
    from mingpt.sample import build_gpt
    from mingpt.trainer import DTYPES, chosen_precision, compute_capability

    model = build_gpt(path, weights, saved).to(device)
    config, trainer = DataConfig(**saved["CONFIG"]["data_config"]), saved["CONFIG"]["trainer_config"]
    config.path = args.data_path or config.path
    text = cached_path(config) if is_url(config.path) else Path(config.path)  # a download is kept in data/, where training ran
    if not text.is_file():
        cli.fail(f"{path} was trained on {config.path}, which is not at {text}; pass --data_path with that text")
    config.path = str(text)
    try:
        _, test_set = split_datasets(read_text(config), saved["VOCAB"], config)
    except DataError as err:
        cli.fail(f"{config.path} is not the text {path} was trained on ({err})")
    # As the training evaluated: in the precision it chose for this device.
    dtype = DTYPES[chosen_precision(trainer["precision"], trainer["strategy"], compute_capability(torch.device(device)))[0]]
    total = 0.0
    with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
        for batch in torch.arange(len(test_set)).split(trainer["batch_size"]):
            source, targets = (t.to(device) for t in test_set[batch])
            total += model(source, targets)[1].item() * len(batch)
        source, targets = test_set[[0]]
        predicted = model(source.to(device))[0].argmax(-1)[0].tolist()
    print(f"{path}: test loss {total / len(test_set):.4f} on {len(test_set):,} held-out windows", flush=True)
    print(f"  next characters {decode(targets[0].tolist(), saved['VOCAB'])!r}")
    print(f"  predicted       {decode(predicted, saved['VOCAB'])!r}")


def main(args: argparse.Namespace) -> None:
    device = cli.resolve_device(args)
    for path in args.checkpoints:
        try:
            weights, saved = snapshots.read_weights(path)
        except snapshots.SnapshotError as err:
            cli.fail(str(err))
        if "VOCAB" in saved and "CONFIG" in saved:
            predict_gpt(path, weights, saved, args, device)
        else:
            predict_step(path, weights, args, device)


if __name__ == "__main__":
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoints", nargs="+", metavar="FILE", help="files a training run saved; each is evaluated in turn")
    parser.add_argument(
        "--workload",
        default="toy",
        choices=["toy", "images"],
        help="steps 1-6: the workload the file was trained on, as the step's --workload (default: toy)",
    )
    parser.add_argument(
        "--data_dir",
        default="./data",
        help="images: where CIFAR-10 is, or is downloaded to; 'fake' for the generated images the training used (default: ./data)",
    )
    parser.add_argument(
        "--data_path",
        help="minGPT: the text it was trained on (default: its data_config.path, or for a URL the download in data/ where it trained)",
    )
    cli.add_one_process_device(parser, "where to evaluate")
    main(parser.parse_args())
