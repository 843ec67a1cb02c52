"""Character-level data: a text file (or URL) becomes one tensor of character ids.

The corpus is encoded once, vectorised. A training item is a window of `block_size + 1`
characters: the model reads the first `block_size` and predicts each next one. The text is
split at one point (train first, test after), so no test window overlaps a training window.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mingpt.config import DataConfig


class DataError(Exception):
    """The text cannot be had or used; the message says what failed and how to fix it."""


def is_url(path: str) -> bool:
    return path.startswith(("http://", "https://"))


def cached_path(config: DataConfig) -> Path:
    """Where a download of `config.path` is kept: one file per URL."""
    url_hash = hashlib.sha256(config.path.encode()).hexdigest()[:12]
    return Path(config.cache_dir) / f"{url_hash}-{os.path.basename(config.path) or 'download'}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(config: DataConfig) -> Path:
    """Fetch `config.path` into the cache unless a good copy is there; return the local file."""
    target = cached_path(config)
    if target.exists() and (not config.sha256 or file_sha256(target) == config.sha256):
        return target
    how_to_fix = "download it yourself and pass data_config.path=/path/to/file"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(config.path, timeout=30) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", None) or err
        raise DataError(f"could not download {config.path} ({reason}); {how_to_fix}") from None
    if config.sha256 and hashlib.sha256(data).hexdigest() != config.sha256:
        raise DataError(
            f"{config.path} does not match data_config.sha256 {config.sha256} (got {hashlib.sha256(data).hexdigest()}); "
            f"{how_to_fix}, or correct the checksum"
        )
    # Atomic: a rank reading the cache never sees a half-written file.
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.replace(tmp, target)
    return target


def local_text_path(config: DataConfig) -> Path:
    """The file to read: the configured one, or the cached download (which must exist by now)."""
    path = cached_path(config) if is_url(config.path) else Path(config.path)
    if not path.is_file():
        raise DataError(f"data file {path} not found; pass data_config.path=/path/to/text.txt or an http(s) URL")
    return path


def read_text(config: DataConfig) -> str:
    text = local_text_path(config).read_text(encoding="utf-8")
    return text[: int(len(text) * config.truncate)]


def vocabulary(text: str) -> list[str]:
    """The sorted distinct characters of `text`: character i has id i."""
    return sorted(set(text))


def encode(text: str, chars: list[str]) -> torch.Tensor:
    """All of `text` as one int64 tensor of ids, without a Python loop over its characters."""
    codepoints = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32).long()
    vocab_codepoints = torch.tensor([ord(c) for c in chars], dtype=torch.long)
    ids = torch.searchsorted(vocab_codepoints, codepoints).clamp(max=len(chars) - 1)
    known = vocab_codepoints[ids] == codepoints
    if not bool(known.all()):
        unknown = sorted({chr(int(c)) for c in codepoints[~known][:100]})
        raise DataError(f"the text has characters the vocabulary lacks ({''.join(unknown)!r}); train on the text the snapshot was made from")
    return ids


def decode(ids: list[int], chars: list[str]) -> str:
    return "".join(chars[i] for i in ids)


class CharDataset(Dataset):
    """Windows of `block_size + 1` characters; indexing with a batch of start positions gathers them at once."""

    def __init__(self, data: torch.Tensor, block_size: int):
        if len(data) <= block_size:
            raise DataError(f"{len(data)} characters cannot fill one window of block_size {block_size}; use more text or a smaller block_size")
        self.data = data
        self.block_size = block_size
        self.offsets = torch.arange(block_size + 1)

    def __len__(self) -> int:
        return len(self.data) - self.block_size

    def __getitem__(self, starts: list[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        windows = self.data[torch.as_tensor(starts).unsqueeze(1) + self.offsets]
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def split_datasets(text: str, chars: list[str], config: DataConfig) -> tuple[CharDataset, CharDataset]:
    """Train on the text before one split point, test on the text after it."""
    data = encode(text, chars)
    split = int(len(data) * config.train_split)
    return CharDataset(data[:split], config.block_size), CharDataset(data[split:], config.block_size)
