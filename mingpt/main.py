"""minGPT capstone: train a character-level GPT on Tiny Shakespeare with DDP.

    torchrun --standalone --nproc_per_node=gpu mingpt/main.py
    torchrun --standalone --nproc_per_node=2 mingpt/main.py gpt_config.n_layer=2 gpt_config.n_embd=64   # CPU

Settings come from gpt2_train_cfg.yaml (plain YAML, no Hydra); any of them can be overridden
on the command line as section.key=value. After training, rank 0 prints a sample of text.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch.distributed import destroy_process_group, init_process_group

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # datautils.py, shared with the step scripts
import datautils  # noqa: E402
from char_dataset import DataConfig, DataError, decode, download, is_url, read_text, split_datasets, vocabulary  # noqa: E402
from model import GPT, GPTConfig, OptimizerConfig  # noqa: E402
from trainer import Trainer, TrainerConfig  # noqa: E402

DEFAULT_CONFIG = Path(__file__).with_name("gpt2_train_cfg.yaml")
SECTIONS = {"data_config": DataConfig, "gpt_config": GPTConfig, "trainer_config": TrainerConfig, "optimizer_config": OptimizerConfig}
FROM_DATA = {"vocab_size", "block_size"}  # GPTConfig fields set from the data, not by the user
SNAPSHOT_KEYS = ("MODEL_STATE", "OPTIMIZER_STATE", "SCALER_STATE", "EPOCHS_RUN", "STEP_IN_EPOCH", "RNG_STATES", "VOCAB", "CONFIG")


class ConfigError(Exception):
    """A bad setting; the message says which and what is valid."""


def settable_fields(section: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(SECTIONS[section]) if not (section == "gpt_config" and f.name in FROM_DATA)}


def typed(section: str, key: str, value: Any) -> Any:
    """`value` checked against the field's type (an int is a fine float; None is an empty string)."""
    kind = settable_fields(section)[key].type
    if kind == "str" and value is None:
        return ""
    if kind == "float" and isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            value = float(value)
        except ValueError:
            pass
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
    }[kind]
    if not ok:
        raise ConfigError(f"{section}.{key} must be {kind}, got {value!r}")
    return float(value) if kind == "float" else value


def load_config(path: str | Path, overrides: list[str]) -> dict[str, Any]:
    """The four config sections from YAML, with `section.key=value` overrides applied and checked."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config {path}: {datautils.brief(err)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must map section names to settings")
    for override in overrides:
        dotted, sep, text = override.partition("=")
        section, dot, key = dotted.partition(".")
        if not sep or not dot or not key:
            raise ConfigError(f"malformed override {override!r}: write section.key=value, e.g. trainer_config.max_epochs=5")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{section} must be a mapping of settings")
        raw[section][key] = yaml.safe_load(text) if text else None
    configs = {}
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown section {section!r}; valid sections: {', '.join(SECTIONS)}")
        values = values or {}
        for key in values:
            if key not in settable_fields(section):
                raise ConfigError(f"unknown key {section}.{key}; valid keys: {', '.join(settable_fields(section))}")
        configs[section] = SECTIONS[section](**{k: typed(section, k, v) for k, v in values.items()})
    for section, cls in SECTIONS.items():
        configs.setdefault(section, cls())
    check_values(configs)
    return configs


def check_values(configs: dict[str, Any]) -> None:
    """Ranges that a type cannot express."""
    data, gpt, trainer, opt = (configs[s] for s in SECTIONS)
    positive = {
        "data_config.block_size": data.block_size, "gpt_config.n_layer": gpt.n_layer, "gpt_config.n_head": gpt.n_head,
        "gpt_config.n_embd": gpt.n_embd, "trainer_config.max_epochs": trainer.max_epochs,
        "trainer_config.batch_size": trainer.batch_size, "trainer_config.grad_accum_steps": trainer.grad_accum_steps,
        "trainer_config.grad_norm_clip": trainer.grad_norm_clip, "trainer_config.save_every": trainer.save_every,
        "trainer_config.log_every": trainer.log_every, "optimizer_config.learning_rate": opt.learning_rate,
    }  # fmt: skip
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{name} must be greater than 0, got {value}")
    if not 0 < data.train_split < 1 or not 0 < data.truncate <= 1:
        raise ConfigError("data_config.train_split must be in (0, 1) and data_config.truncate in (0, 1]")
    if not 0 <= gpt.dropout < 1 or opt.weight_decay < 0:
        raise ConfigError("gpt_config.dropout must be in [0, 1) and optimizer_config.weight_decay at least 0")
    if gpt.n_embd % gpt.n_head:
        raise ConfigError(f"gpt_config.n_embd ({gpt.n_embd}) must be a multiple of gpt_config.n_head ({gpt.n_head})")
    if trainer.precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ConfigError(f"trainer_config.precision must be auto, bf16, fp16 or fp32, got {trainer.precision!r}")


def ddp_setup() -> torch.device:
    """Join the process group: NCCL on GPUs, gloo on CPUs. Returns this rank's device."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # the few fp32 matmuls left under bf16
        torch.backends.cudnn.allow_tf32 = True
        init_process_group(backend="nccl")
        return device
    init_process_group(backend="gloo")
    return torch.device("cpu")


def fetch_data(config: DataConfig) -> None:
    """A URL is downloaded once per node (local rank 0) while the other ranks wait."""
    if is_url(config.path):
        error = datautils.on_local_rank_zero_first(lambda: download(config))
        if error:
            datautils.fail(error)


def load_snapshot(path: str) -> dict[str, Any] | None:
    """Global rank 0 reads the snapshot (nodes share no files) and broadcasts it, or the error, or None."""
    message: list[Any] = [None]
    if dist.get_rank() == 0 and os.path.exists(path):
        try:  # onto the CPU: a tensor broadcast as an object would arrive on rank 0's GPU
            message[0] = datautils.read_snapshot(path, map_location="cpu", required_keys=SNAPSHOT_KEYS)
        except datautils.SnapshotError as err:
            message[0] = str(err)
    dist.broadcast_object_list(message, src=0)
    if isinstance(message[0], str):
        raise datautils.SnapshotError(message[0])
    return message[0]


def main(configs: dict[str, Any]) -> None:
    data_config, gpt_config, trainer_config, optimizer_config = (configs[s] for s in SECTIONS)
    device = ddp_setup()
    try:
        torch.manual_seed(trainer_config.seed + dist.get_rank())  # rank 0's weights are the ones DDP broadcasts
        snapshot = load_snapshot(trainer_config.snapshot_path)
        fetch_data(data_config)
        text = read_text(data_config)
        chars = snapshot["VOCAB"] if snapshot else vocabulary(text)  # ids must mean what they meant when saved
        train_set, test_set = split_datasets(text, chars, data_config)
        gpt_config.vocab_size, gpt_config.block_size = len(chars), data_config.block_size
        model = GPT(gpt_config).to(device)
        optimizer = model.configure_optimizer(optimizer_config, device.type)
        extra_state = {"VOCAB": chars, "CONFIG": {s: dataclasses.asdict(c) for s, c in configs.items()}}
        trainer = Trainer(trainer_config, model, optimizer, train_set, test_set, snapshot, extra_state, device)
        if dist.get_rank() == 0:
            print(f"GPT: {model.num_params() / 1e6:.2f}M parameters, vocabulary {len(chars)}, "
                  f"{len(train_set):,} training windows, {dist.get_world_size()} ranks on {device.type}", flush=True)  # fmt: skip
        trainer.train()
        if dist.get_rank() == 0:
            model.eval()
            context = test_set.data[: min(16, data_config.block_size)].unsqueeze(0).to(device)
            sample = model.generate(context, max_new_tokens=200, temperature=0.8)[0].tolist()
            print("Sample:\n" + decode(sample, chars), flush=True)
    except (datautils.SnapshotError, DataError) as err:
        datautils.fail(str(err))
    finally:
        # Drop DDP, and the model and optimizer whose tensors it shares, before the process group
        # it uses: otherwise the process may abort at exit ("terminate called without an active exception").
        trainer = model = optimizer = None
        gc.collect()
        destroy_process_group()


def settings_help() -> str:
    """Every setting an override may name, with its value in the default config file."""
    defaults = load_config(DEFAULT_CONFIG, [])
    lines = [f"settings, as section.key=value (their meaning is in {DEFAULT_CONFIG.name}; these are its values):"]
    for section in SECTIONS:
        lines += [f"  {section}.{key}={getattr(defaults[section], key)}" for key in settable_fields(section)]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = datautils.ArgumentParser(
        description="Train a character-level GPT with DDP. Launch with torchrun.",
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keeps the settings one per line
    )
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
        datautils.fail(str(err))
    if "LOCAL_RANK" not in os.environ:
        datautils.fail("mingpt/main.py is launched by torchrun: torchrun --standalone --nproc_per_node=gpu mingpt/main.py (on CPU: --nproc_per_node=2)")
    datautils.check_writable_folder(configs["trainer_config"].snapshot_path)
    main(configs)
