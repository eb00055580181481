"""A third-party training loop: a tiny GPT-2 trained with the Hugging Face Trainer.

This script knows nothing about the profiler (it does not import it). It is
here so that ``python -m profiler examples/hf_trainer.py`` can be checked on a
training loop nobody in this project wrote: the Trainer builds its own
DataLoader and optimizer, moves the model, and calls it from deep inside
``transformers``. Everything runs on the CPU in a few seconds, offline: the
model is built from a config, the data are random token ids.

    python examples/hf_trainer.py [--steps N]
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

# The tiny config: 2 layers, 32 wide, 2 heads, a 100-token vocabulary, 32 positions
# (29,696 unique parameters: the output projection is tied to the token embedding).
CONFIG = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0)


class RandomTokens(Dataset):
    """Random token ids; the labels are the inputs (the model shifts them itself)."""

    def __init__(self, n: int, seq_len: int, vocab_size: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, vocab_size, (n, seq_len), generator=g)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.data[i]
        return {"input_ids": ids, "labels": ids.clone()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=16)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**CONFIG))
    dataset = RandomTokens(32, args.seq_len, CONFIG["vocab_size"])
    with tempfile.TemporaryDirectory(prefix="hf_trainer_") as out:
        training_args = TrainingArguments(
            output_dir=out,
            max_steps=args.steps,
            per_device_train_batch_size=4,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=training_args, train_dataset=dataset)
        trainer.train()
    print("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
