"""minGPT capstone: train a character-level GPT on Tiny Shakespeare with DDP.

    torchrun --standalone --nproc_per_node=gpu mingpt/main.py
    torchrun --standalone --nproc_per_node=2 mingpt/main.py gpt_config.n_layer=2 gpt_config.n_embd=64   # CPU

Settings come from gpt2_train_cfg.yaml (plain YAML, no Hydra, checked in mingpt/config.py); any
of them can be overridden on the command line as section.key=value. After training, rank 0
prints a sample of text; mingpt/sample.py samples a saved snapshot without training.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the repository root holds mingpt/, datautils.py and support/

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed import destroy_process_group, init_process_group  # noqa: E402

import datautils  # noqa: E402
from mingpt.char_dataset import CharDataset, DataError, decode, download, is_url, read_text, split_datasets, vocabulary  # noqa: E402
from mingpt.config import DEFAULT_CONFIG, Configs, ConfigError, load_config, settings_help  # noqa: E402
from mingpt.model import GPT  # noqa: E402
from mingpt.trainer import Trainer, batch_plan, saved_snapshot, shard  # noqa: E402
from support import cli, launch, snapshots  # noqa: E402

USAGE = "torchrun --standalone --nproc_per_node=gpu mingpt/main.py (on CPU: --nproc_per_node=2)"


def ddp_setup(timeout: datetime.timedelta | None) -> torch.device:
    """Join the process group: NCCL on GPUs, gloo on CPUs. Returns this rank's device."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # the few fp32 matmuls left under bf16
        torch.backends.cudnn.allow_tf32 = True
        init_process_group(backend="nccl", timeout=timeout)
        return device
    init_process_group(backend="gloo", timeout=timeout)
    return torch.device("cpu")


def load_datasets(configs: Configs, chars: list[str] | None) -> tuple[list[str], CharDataset, CharDataset]:
    """The vocabulary (the snapshot's, if resuming: ids must mean what they meant when saved) and the
    train and test windows. A URL is downloaded once per node (local rank 0) while the others wait."""
    if is_url(configs.data.path):
        error = datautils.on_local_rank_zero_first(lambda: download(configs.data))
        if error:
            cli.fail(error)
    try:
        text = read_text(configs.data)
        chars = chars or vocabulary(text)
        return chars, *split_datasets(text, chars, configs.data)
    except DataError as err:
        cli.fail(str(err))


def main(configs: Configs) -> None:
    timeout = datetime.timedelta(seconds=configs.trainer.timeout) if configs.trainer.timeout else None
    device = ddp_setup(timeout)
    rank = dist.get_rank()
    batch_plan(configs.trainer, dist.get_world_size())  # a global batch this many processes cannot share fails here, in one line
    torch.manual_seed(configs.trainer.seed + rank)  # rank 0's weights are the ones DDP broadcasts
    snapshot = saved_snapshot(configs.trainer)  # each node's newest copy (ddp), or the shared sharded one's small part (fsdp)
    chars, train_set, test_set = load_datasets(configs, snapshot["VOCAB"] if snapshot else None)
    configs.gpt.vocab_size, configs.gpt.block_size = len(chars), configs.data.block_size
    model = GPT(configs.gpt).to(device)
    if configs.trainer.strategy == "fsdp":
        shard(model, configs.trainer.precision, device)  # before the optimizer is made: it must hold the shards
    optimizer = model.configure_optimizer(configs.optimizer, device.type)
    extra_state = {"VOCAB": chars, "CONFIG": configs.as_dict()}
    trainer = Trainer(configs.trainer, model, optimizer, configs.optimizer, train_set, test_set, snapshot, extra_state, device)
    trainer.report.log(
        f"GPT: {model.num_params() / 1e6:.2f}M parameters, vocabulary {len(chars)}, "
        f"{len(train_set):,} training windows, {cli.plural(dist.get_world_size(), 'rank')} on {device.type}"
    )
    trainer.train()
    # Every rank samples (with fsdp a forward is collective); rank 0 prints.
    model.eval()
    context = test_set.data[: min(16, configs.data.block_size)].unsqueeze(0).to(device)
    sample = model.generate(context, max_new_tokens=200, temperature=0.8)[0].tolist()
    if rank == 0:
        print("Sample:\n" + decode(sample, chars), flush=True)
    destroy_process_group()


if __name__ == "__main__":
    parser = cli.ArgumentParser(description="Train a character-level GPT with DDP. Launch with torchrun.", epilog=settings_help())
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="override a setting of the config file, e.g. trainer_config.max_epochs=5 gpt_config.n_layer=4",
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help=f"the YAML config file (default: {DEFAULT_CONFIG.name} beside main.py)")
    args = parser.parse_args()
    try:
        configs = load_config(args.config, args.overrides)
    except ConfigError as err:
        cli.fail(str(err))
    launch.torchrun_worker("cuda" if torch.cuda.is_available() else "cpu", USAGE, configs.trainer.snapshot_path)
    if configs.trainer.best_snapshot_path:
        snapshots.check_writable_folder(configs.trainer.best_snapshot_path)
    main(configs)
