"""Run by tests/test_equivalence.py under torchrun: one fixed model evaluated on the held-out set
by step 4's own code (its evaluation sampler and Trainer._evaluate), and, for comparison, with
DistributedSampler, which pads the shards with repeated samples. Rank 0 prints both as JSON.
"""

import json
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

import datautils  # noqa: E402
import multinode  # noqa: E402

dist.init_process_group("gloo")
_, val_set, model, _ = datautils.load_train_objs()  # seeded: the same weights on every rank
inner = types.SimpleNamespace(module=model)
exact = types.SimpleNamespace(model=inner, device="cpu", val_data=multinode.prepare_dataloader(val_set, 128, 0, False, train=False))
padding_sampler = DistributedSampler(val_set, shuffle=False)
padded = types.SimpleNamespace(model=inner, device="cpu", val_data=DataLoader(val_set, 128, sampler=padding_sampler, collate_fn=datautils.collate))
result = {"exact": multinode.Trainer._evaluate(exact), "padded": multinode.Trainer._evaluate(padded)}
if dist.get_rank() == 0:
    print(json.dumps(result), flush=True)
dist.destroy_process_group()
