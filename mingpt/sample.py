"""Sample the GPT without training: load a snapshot on one device, no process group, and continue a prompt.

    python mingpt/sample.py                                   # gpt_snapshot.pt, from a new line
    python mingpt/sample.py gpt_best.pt --prompt "O God, O God!" --max_new_tokens 200 --temperature 0.8 --top_k 40 --seed 1337

Reads what training saved (gpt_snapshot.pt; the best model, trainer_config.best_snapshot_path; an FSDP
snapshot made one file by tools/convert_dcp.py) with weights_only=True, and rebuilds the GPT from the
CONFIG and VOCAB saved in it. The same command prints the same text on the same device: the draws are
seeded (--seed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the repository root holds mingpt/ and support/

import torch  # noqa: E402

from support import cli  # noqa: E402
from support import snapshots  # noqa: E402
from mingpt.char_dataset import decode, encode  # noqa: E402
from mingpt.config import GPTConfig  # noqa: E402
from mingpt.model import GPT  # noqa: E402


def load_gpt(path: str, device: str) -> tuple[GPT, dict[str, Any]]:
    """The GPT a snapshot file holds, in eval mode on `device`, and the whole snapshot (its VOCAB, CONFIG, ...).
    Anything else ends the program with one line."""
    try:
        weights, saved = snapshots.read_weights(path)
    except snapshots.SnapshotError as err:
        cli.fail(str(err))
    return build_gpt(path, weights, saved).to(device), saved


def build_gpt(path: str, weights: dict[str, torch.Tensor], saved: dict[str, Any]) -> GPT:
    """The GPT of a snapshot read by snapshots.read_weights, rebuilt from its CONFIG, in eval mode on the CPU."""
    if "VOCAB" not in saved or "CONFIG" not in saved:
        cli.fail(f"{path} is no minGPT snapshot (it has no VOCAB and CONFIG); pass gpt_snapshot.pt, a best snapshot or a converted FSDP one")
    try:
        model = GPT(GPTConfig(**saved["CONFIG"]["gpt_config"]))
        model.load_state_dict(weights)
    except (TypeError, KeyError, AssertionError, RuntimeError) as err:  # a CONFIG or weights of another version of this GPT
        cli.fail(f"{path} does not hold a GPT of this code ({cli.brief(err)}); sample it with the code that trained it")
    return model.eval()


def main(args: argparse.Namespace) -> None:
    device = cli.resolve_device(args)
    model, saved = load_gpt(args.snapshot, device)
    chars = saved["VOCAB"]
    unknown = sorted(set(args.prompt) - set(chars))
    if unknown:
        cli.fail(f"--prompt has characters {''.join(unknown)!r} that {args.snapshot}'s vocabulary lacks; it knows {''.join(chars)!r}")
    torch.manual_seed(args.seed)  # the draws of torch.multinomial in generate: the same seed, the same text
    context = encode(args.prompt, chars).unsqueeze(0).to(device)
    sample = model.generate(context, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)[0].tolist()
    print(decode(sample, chars), flush=True)


if __name__ == "__main__":
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("snapshot", nargs="?", default="gpt_snapshot.pt", help="the snapshot file to sample (default: gpt_snapshot.pt)")
    parser.add_argument("--prompt", default="\n", help="the text to continue; only characters of the training text (default: a new line)")
    parser.add_argument("--max_new_tokens", type=cli.positive_int, default=200, help="how many characters to add to the prompt (default: 200)")
    parser.add_argument(
        "--temperature",
        type=cli.positive_float,
        default=0.8,
        help="divides the logits before sampling: below 1 picks likely characters more often, above 1 less (default: 0.8)",
    )
    parser.add_argument("--top_k", type=cli.positive_int, help="sample only among the k most likely characters (default: all of them)")
    parser.add_argument("--seed", type=int, default=1337, help="seeds the draws: the same seed prints the same text (default: 1337)")
    cli.add_one_process_device(parser, "where to run the model")
    main(parser.parse_args())
