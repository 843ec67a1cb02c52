"""Every setting of the capstone: its default, what it means, and its check, side by side.

Settings come from a YAML file (gpt2_train_cfg.yaml) in four sections, one dataclass each; any of
them can be overridden on the command line as `section.key=value`. A wrong name, type or value
is a ConfigError whose message says what is valid.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DEFAULT_CONFIG = Path(__file__).with_name("gpt2_train_cfg.yaml")


class ConfigError(Exception):
    """A bad setting; the message says which and what is valid."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def positive(section: str, config: Any, *names: str) -> None:
    for name in names:
        require(getattr(config, name) > 0, f"{section}.{name} must be greater than 0, got {getattr(config, name)}")


@dataclass
class DataConfig:
    path: str = TINY_SHAKESPEARE_URL  # a local file, or an http(s) URL downloaded once per node
    sha256: str = ""  # checked for downloads when set
    cache_dir: str = "data"  # where downloads are kept
    block_size: int = 128  # characters of context
    train_split: float = 0.9  # the first 90% of the text trains, the rest tests
    truncate: float = 1.0  # use only this leading fraction of the text

    def __post_init__(self) -> None:
        positive("data_config", self, "block_size")
        require(0 < self.train_split < 1, f"data_config.train_split must be in (0, 1), got {self.train_split}")
        require(0 < self.truncate <= 1, f"data_config.truncate must be in (0, 1], got {self.truncate}")


@dataclass
class GPTConfig:
    n_layer: int = 8
    n_head: int = 8
    n_embd: int = 512
    dropout: float = 0.1
    vocab_size: int = 0  # set from the data, not from the YAML
    block_size: int = 0  # set from data_config.block_size

    def __post_init__(self) -> None:
        positive("gpt_config", self, "n_layer", "n_head", "n_embd")
        require(0 <= self.dropout < 1, f"gpt_config.dropout must be in [0, 1), got {self.dropout}")
        require(self.n_embd % self.n_head == 0, f"gpt_config.n_embd ({self.n_embd}) must be a multiple of gpt_config.n_head ({self.n_head})")


@dataclass
class OptimizerConfig:
    learning_rate: float = 3e-4  # the peak, reached after the warm-up
    weight_decay: float = 0.1
    warmup_steps: int = 100  # optimizer steps of linear warm-up from 0
    min_lr: float = 3e-5  # the floor the cosine decay ends at, after the last step

    def __post_init__(self) -> None:
        positive("optimizer_config", self, "learning_rate")
        require(self.weight_decay >= 0, f"optimizer_config.weight_decay must be at least 0, got {self.weight_decay}")
        require(self.warmup_steps >= 0, f"optimizer_config.warmup_steps must be at least 0, got {self.warmup_steps}")
        require(
            0 <= self.min_lr <= self.learning_rate,
            f"optimizer_config.min_lr must be in [0, learning_rate {self.learning_rate}], got {self.min_lr}",
        )


@dataclass
class TrainerConfig:
    max_epochs: int = 10
    batch_size: int = 216  # windows per process and micro-step: what fits in memory at once
    global_batch_size: int = 0  # windows per optimizer step over all processes; 0: batch_size x processes x grad_accum_steps
    grad_accum_steps: int = 1  # micro-steps per optimizer step (derived instead when global_batch_size is set)
    grad_norm_clip: float = 1.0
    precision: str = "auto"  # auto, bf16, fp16 or fp32; auto: bf16 on GPUs with bf16 units, fp16 on older ones (fp32 with fsdp), fp32 on CPU
    strategy: str = "ddp"  # ddp: every process holds the whole model; fsdp: each holds 1/N of it (FSDP2)
    compile: bool = False  # torch.compile the model
    snapshot_path: str = "gpt_snapshot.pt"
    save_every: int = 3  # epochs
    eval_every: int = 0  # optimizer steps between test-loss evaluations within an epoch; 0: at each epoch's end only
    best_snapshot_path: str = ""  # keep the model of the lowest test loss here (fsdp: a folder, as snapshot_path); empty: not kept
    patience: int = 0  # stop after this many evaluations in a row without a lower test loss; 0: never stop early
    log_every: int = 10  # optimizer steps
    metrics_path: str = "gpt_metrics.jsonl"  # one JSON object per log line, appended
    tensorboard_dir: str = ""  # write TensorBoard scalars here (rank 0); empty: none
    timeout: float = 0.0  # seconds a collective waits for a missing rank; 0: torch's default
    seed: int = 1337

    def __post_init__(self) -> None:
        positive("trainer_config", self, "max_epochs", "batch_size", "grad_accum_steps", "grad_norm_clip", "save_every", "log_every")
        require(self.global_batch_size >= 0, f"trainer_config.global_batch_size must be at least 0, got {self.global_batch_size}")
        require(
            self.global_batch_size == 0 or self.grad_accum_steps == 1,
            "set trainer_config.global_batch_size or trainer_config.grad_accum_steps, not both: "
            "with a global batch, the accumulation follows from it",
        )
        require(
            self.precision in ("auto", "bf16", "fp16", "fp32"), f"trainer_config.precision must be auto, bf16, fp16 or fp32, got {self.precision!r}"
        )
        require(self.eval_every >= 0, f"trainer_config.eval_every must be at least 0, got {self.eval_every}")
        require(self.patience >= 0, f"trainer_config.patience must be at least 0, got {self.patience}")
        require(
            not self.best_snapshot_path or self.best_snapshot_path != self.snapshot_path,
            f"trainer_config.best_snapshot_path must differ from snapshot_path ({self.snapshot_path}): the latest would overwrite the best",
        )
        require(self.timeout >= 0, f"trainer_config.timeout must be at least 0, got {self.timeout}")
        require(self.strategy in ("ddp", "fsdp"), f"trainer_config.strategy must be ddp or fsdp, got {self.strategy!r}")
        require(
            not (self.strategy == "fsdp" and self.precision == "fp16"),
            "trainer_config.strategy=fsdp takes precision bf16, fp32 or auto: fp16 needs a loss scaler that FSDP's sharded gradients do not have here",
        )


SECTIONS = {"data_config": DataConfig, "gpt_config": GPTConfig, "trainer_config": TrainerConfig, "optimizer_config": OptimizerConfig}
FROM_DATA = {"vocab_size", "block_size"}  # GPTConfig fields set from the data, not by the user


@dataclass
class Configs:
    data: DataConfig
    gpt: GPTConfig
    trainer: TrainerConfig
    optimizer: OptimizerConfig

    def parts(self) -> list[Any]:
        """The four sections, in the order of SECTIONS."""
        return [self.data, self.gpt, self.trainer, self.optimizer]

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """By YAML section name, as saved in snapshots."""
        return {section: dataclasses.asdict(config) for section, config in zip(SECTIONS, self.parts())}


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


def load_config(path: str | Path, overrides: list[str]) -> Configs:
    """The four config sections from YAML, with `section.key=value` overrides applied and checked."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config {path}: {' '.join(str(err).split())}") from None
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
    sections = {}
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown section {section!r}; valid sections: {', '.join(SECTIONS)}")
        for key in values or {}:
            if key not in settable_fields(section):
                raise ConfigError(f"unknown key {section}.{key}; valid keys: {', '.join(settable_fields(section))}")
        sections[section] = SECTIONS[section](**{k: typed(section, k, v) for k, v in (values or {}).items()})
    return Configs(*(sections.get(section) or cls() for section, cls in SECTIONS.items()))


def settings_help() -> str:
    """Every setting an override may name, with its value in the default config file."""
    defaults = load_config(DEFAULT_CONFIG, [])
    lines = [f"settings, as section.key=value (their meaning is in {DEFAULT_CONFIG.name} and mingpt/config.py; these are its values):"]
    for section, config in zip(SECTIONS, defaults.parts()):
        lines += [f"  {section}.{key}={getattr(config, key)}" for key in settable_fields(section)]
    return "\n".join(lines)
