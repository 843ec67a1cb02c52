"""Step 1: train on one device.  Run: python single_gpu.py [total_epochs save_every]

The baseline every later step changes: a Trainer that runs batches and epochs, evaluates on
held-out data, prints one line per epoch and saves a checkpoint every `save_every` epochs.
"""

import argparse

import torch
from torch.utils.data import DataLoader, Dataset

from support import cli
import datautils
from support import snapshots
from datautils import load_train_objs, loss_fn
from support.report import Report

CHECKPOINT_PATH = "checkpoint.pt"


class Trainer:
    def __init__(
        self,
        model: torch.nn.Module,
        train_data: DataLoader,
        val_data: DataLoader,
        optimizer: torch.optim.Optimizer,
        device: str,
        save_every: int,
        tensorboard_dir: str | None,
    ) -> None:
        self.device = device
        self.model = model.to(device)
        self.train_data = train_data
        self.val_data = val_data
        self.optimizer = optimizer
        self.save_every = save_every
        self.report = Report(self.model, optimizer, self.device, tensorboard_dir)  # epoch lines, step-time split, TensorBoard

    def _run_batch(self, source: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(self.model(source), targets)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def _run_epoch(self, epoch: int) -> float:
        self.train_data.dataset.set_epoch(epoch)  # new random augmentations each epoch, the same in every run
        loss_sum = torch.zeros((), device=self.device)  # stays on the device: no wait for the GPU per step
        samples = 0
        for source, targets in self.report.timed(self.train_data):  # times each wait for a batch
            source = source.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            loss_sum += self._run_batch(source, targets) * len(source)
            samples += len(source)
        return loss_sum.item() / samples

    def _evaluate(self) -> dict[str, float]:
        sums = datautils.evaluate(self.model, self.val_data, self.device)  # loss, samples (and correct)
        return datautils.metrics(sums)

    def _save_checkpoint(self, epoch: int) -> None:
        snapshots.atomic_save(self.model.state_dict(), CHECKPOINT_PATH)
        print(f"Epoch {epoch + 1} | checkpoint saved at {CHECKPOINT_PATH}", flush=True)

    def train(self, max_epochs: int) -> None:
        for epoch in range(max_epochs):
            loss = self._run_epoch(epoch)
            val = self._evaluate()
            self.report.epoch(epoch, max_epochs, self.train_data.batch_size, loss, val)
            if (epoch + 1) % self.save_every == 0 or epoch + 1 == max_epochs:
                self._save_checkpoint(epoch)


def prepare_dataloader(dataset: Dataset, batch_size: int, num_workers: int, train: bool = True) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        pin_memory=torch.cuda.is_available(),
        shuffle=train,
        num_workers=num_workers,
        collate_fn=datautils.collate,  # takes the toy's batches whole
    )


def main(device: str, args: argparse.Namespace) -> None:
    train_set, val_set, model, optimizer = load_train_objs(args.workload, args.data_dir)
    train_data = prepare_dataloader(train_set, args.batch_size, args.num_workers)
    val_data = prepare_dataloader(val_set, 4 * args.batch_size, args.num_workers, train=False)  # no gradients kept: larger batches fit
    trainer = Trainer(model, train_data, val_data, optimizer, device, args.save_every, args.tensorboard_dir)
    trainer.train(args.total_epochs)


if __name__ == "__main__":
    parser = cli.ArgumentParser(description=__doc__)
    cli.add_training_args(parser, distributed=False)
    args = parser.parse_args()

    device = cli.resolve_device(args)
    snapshots.check_writable_folder(CHECKPOINT_PATH)
    main(device, args)
