"""Step 1: train on one device: the baseline every later step changes.

Run: python single_gpu.py [total_epochs save_every]
"""

import argparse

import torch
from torch.utils.data import DataLoader, Dataset

import datautils
from datautils import load_train_objs, loss_fn
from support import cli, launch, snapshots
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
        self.model = model.to(self.device)
        self.train_data = train_data
        self.val_data = val_data
        self.optimizer = optimizer
        self.save_every = save_every
        self.report = Report(self.model, optimizer, self.device, tensorboard_dir)  # the epoch line, where the step time went, TensorBoard

    def _run_batch(self, source: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(self.model(source), targets)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def _run_epoch(self, epoch: int) -> float:
        self.train_data.dataset.set_augmentation_epoch(epoch)  # images: new random crops and flips each epoch, the same in every run
        loss_sum = torch.zeros((), device=self.device)  # stays on the device: no wait for the GPU per step
        samples = 0
        for source, targets in self.report.timed(self.train_data):  # times each wait for a batch
            source = source.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            loss_sum += self._run_batch(source, targets) * len(source)
            samples += len(source)
        totals = torch.stack([loss_sum, torch.tensor(float(samples), device=self.device)])  # one read of the device, at the end
        return (totals[0] / totals[1]).item()

    def _evaluate(self) -> dict[str, float]:
        sums = datautils.evaluate(self.model, self.val_data, self.device)  # loss, samples (and correct), summed
        return datautils.metrics(sums)

    def _save_checkpoint(self, epoch: int) -> None:
        ckp = self.model.state_dict()
        snapshots.atomic_save(ckp, CHECKPOINT_PATH)  # torch.save to a temporary file, then a rename: never half-written
        print(f"Epoch {epoch + 1} | Training checkpoint saved at {CHECKPOINT_PATH}", flush=True)

    def train(self, max_epochs: int) -> None:
        for epoch in range(max_epochs):
            loss = self._run_epoch(epoch)
            val = self._evaluate()
            self.report.epoch(epoch, max_epochs, self.train_data.batch_size, loss, val)
            if (epoch + 1) % self.save_every == 0 or epoch + 1 == max_epochs:
                self._save_checkpoint(epoch)


def prepare_dataloader(dataset: Dataset, batch_size: int, num_workers: int, pin_memory: bool, train: bool = True) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        pin_memory=pin_memory,
        shuffle=train,
        num_workers=num_workers,
        collate_fn=datautils.collate,  # takes the toy's batches whole
    )


def main(device: str, args: argparse.Namespace) -> None:
    train_set, val_set, model, optimizer = load_train_objs(args)
    train_data = prepare_dataloader(train_set, args.batch_size, args.num_workers, device == "cuda")
    val_data = prepare_dataloader(val_set, 4 * args.batch_size, args.num_workers, device == "cuda", train=False)  # no gradients: bigger batches fit
    trainer = Trainer(model, train_data, val_data, optimizer, device, args.save_every, args.tensorboard_dir)
    trainer.train(args.total_epochs)


if __name__ == "__main__":
    parser = cli.ArgumentParser(description=__doc__)
    cli.add_training_args(parser, launcher="python")
    args = parser.parse_args()

    device = cli.resolve_device(args)
    launch.single_process(CHECKPOINT_PATH)  # a folder it cannot write fails now; Ctrl-C ends in one line
    main(device, args)
