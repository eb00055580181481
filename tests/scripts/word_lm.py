"""A word-level LSTM language model in the shape of PyTorch's examples/word_language_model.

Sequence-first batches ((bptt, batch) token ids, as the example's batchify makes them), an
nn.Embedding encoder, an LSTM (batch_first=False), a Linear decoder registered before the LSTM,
SGD written out by hand, the hidden state carried across batches, and the model saved and
reloaded for a final evaluation. Random tokens: what matters is the shape of the computation.
With --truth PATH it also writes an independent count of what each step saved.
"""

import argparse
import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for autograd_walk


class RNNModel(nn.Module):
    def __init__(self, ntoken, ninp, nhid, nlayers, tie_weights=False):
        super().__init__()
        self.decoder = nn.Linear(nhid, ntoken)  # registered first, run last
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers)
        if tie_weights:
            self.decoder.weight = self.encoder.weight
        self.nhid, self.nlayers = nhid, nlayers

    def forward(self, input, hidden):
        emb = self.encoder(input)
        output, hidden = self.rnn(emb, hidden)
        decoded = self.decoder(output).view(-1, self.decoder.out_features)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz):
        weight = next(self.parameters())
        return (weight.new_zeros(self.nlayers, bsz, self.nhid), weight.new_zeros(self.nlayers, bsz, self.nhid))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch_size", type=int, default=20)
    p.add_argument("--bptt", type=int, default=35)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--lr", type=float, default=20.0)
    p.add_argument("--tied", action="store_true")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--save", default="model.pt")
    p.add_argument("--truth", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    ntokens = 50
    model = RNNModel(ntokens, 32, 32, 2, tie_weights=args.tied).to(getattr(torch, args.dtype))
    data = torch.randint(0, ntokens, (args.bptt * args.batches + 1, args.batch_size))  # (sequence, batch)
    hidden = model.init_hidden(args.batch_size)
    truths = []
    for i in range(0, args.bptt * args.batches, args.bptt):
        source, targets = data[i : i + args.bptt], data[i + 1 : i + 1 + args.bptt].reshape(-1)
        hidden = tuple(h.detach() for h in hidden)
        model.zero_grad()
        output, hidden = model(source, hidden)
        loss = F.nll_loss(output, targets)
        if args.truth:
            from autograd_walk import graph_saved_bytes

            truths.append(graph_saved_bytes(loss, model))
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        for param in model.parameters():
            param.data.add_(param.grad, alpha=-args.lr)
        print(f"batch {i // args.bptt} loss {loss.item():.2f}")
    torch.save(model, args.save)
    with open(args.save, "rb") as f:
        model = torch.load(f, weights_only=False)  # the example reloads the best model to test it
    with torch.no_grad():
        model(data[: args.bptt], model.init_hidden(args.batch_size))
    if args.truth:
        with open(args.truth, "w") as f:
            json.dump(truths, f)


if __name__ == "__main__":
    main()
