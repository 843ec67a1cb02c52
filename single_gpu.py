"""Step 1: train on one device.

    python single_gpu.py 50 10

The baseline every later step changes: a Trainer that runs batches and epochs, prints the
epoch's mean loss, and saves a checkpoint of the model every `save_every` epochs.
"""

import time

import torch
from torch.utils.data import DataLoader, Dataset

import datautils
from datautils import load_train_objs, loss_fn

CHECKPOINT_PATH = "checkpoint.pt"


class Trainer:
    def __init__(
        self,
        model: torch.nn.Module,
        train_data: DataLoader,
        optimizer: torch.optim.Optimizer,
        device: str,
        save_every: int,
    ) -> None:
        self.device = device
        self.model = model.to(device)
        self.train_data = train_data
        self.optimizer = optimizer
        self.save_every = save_every

    def _run_batch(self, source: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        output = self.model(source)
        loss = loss_fn(output, targets)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), datautils.count_correct(output, targets)

    def _run_epoch(self, epoch: int, max_epochs: int) -> None:
        start = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device)  # these stay on the device: no host sync per step
        correct = torch.zeros((), device=self.device)
        samples = 0
        for source, targets in self.train_data:
            source = source.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            loss, batch_correct = self._run_batch(source, targets)
            loss_sum += loss * len(source)
            correct += batch_correct
            samples += len(source)
        mean_loss = loss_sum.item() / samples
        accuracy = f" | accuracy {correct.item() / samples:.1%}" if targets.dtype == torch.long else ""  # class labels
        print(
            f"[{self.device}] Epoch {epoch + 1}/{max_epochs} | steps {len(self.train_data)} | "
            f"batch {self.train_data.batch_size} | loss {mean_loss:.6f}{accuracy} | {time.perf_counter() - start:.3f}s",
            flush=True,
        )

    def _save_checkpoint(self, epoch: int) -> None:
        datautils.atomic_save(self.model.state_dict(), CHECKPOINT_PATH)
        print(f"Epoch {epoch + 1} | checkpoint saved at {CHECKPOINT_PATH}", flush=True)

    def train(self, max_epochs: int) -> None:
        for epoch in range(max_epochs):
            self._run_epoch(epoch, max_epochs)
            if (epoch + 1) % self.save_every == 0 or epoch + 1 == max_epochs:
                self._save_checkpoint(epoch)


def prepare_dataloader(dataset: Dataset, batch_size: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        pin_memory=torch.cuda.is_available(),
        shuffle=True,
    )


def main(device: str, total_epochs: int, save_every: int, batch_size: int, workload: str, data_dir: str) -> None:
    device = datautils.resolve_device(device, allow_mps=True)
    datautils.check_writable_folder(CHECKPOINT_PATH)
    train_set, model, optimizer = load_train_objs(workload, data_dir)
    train_data = prepare_dataloader(train_set, batch_size)
    trainer = Trainer(model, train_data, optimizer, device, save_every)
    trainer.train(total_epochs)


if __name__ == "__main__":
    parser = datautils.ArgumentParser(description="Step 1: train a small model on one device.")
    parser.add_argument("total_epochs", type=datautils.positive_int, help="how many epochs to train")
    parser.add_argument("save_every", type=datautils.positive_int, help="save a checkpoint every this many epochs (and after the last)")
    parser.add_argument("--batch_size", default=32, type=datautils.positive_int, help="input batch size on the device (default: 32)")
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cuda", "mps", "cpu"],
        help="where to train; auto picks CUDA, then Apple MPS, then CPU (default: auto)",
    )
    datautils.add_workload_args(parser)
    args = parser.parse_args()

    main(args.device, args.total_epochs, args.save_every, args.batch_size, args.workload, args.data_dir)
