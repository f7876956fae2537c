"""What mpdiag.sensitivity and keep_fp32 cost on GPT-2, in forward passes of the same batch.

transformers' GPT2LMHeadModel from a config (no download; the overhead benchmark's model: 4 layers,
n_embd 128, GPT-2's vocabulary, batch 8 x 128, the loss computed inside the model), in train mode.
Times one plain fp32 forward (the median of a few), then ``sensitivity`` and ``keep_fp32`` for bf16
and fp16, and prints each in seconds and in forwards, with the passes each reports and what it found.

Run: python benchmarks/sensitivity_cost.py [--layers N] [--vocab N] [--batch N] [--seq N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import mpdiag


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=args.vocab, n_positions=args.seq, n_embd=128, n_layer=args.layers, n_head=4,
        bos_token_id=min(50256, args.vocab - 1), eos_token_id=min(50256, args.vocab - 1),
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))

    def loss(m: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return m(input_ids=ids, labels=ids).loss

    def forward() -> None:
        with torch.no_grad():
            loss(model, ids)

    forward()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        forward()
        times.append(time.perf_counter() - start)
    one = statistics.median(times)
    modules = sum(1 for _ in model.modules())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; GPT-2 {args.layers} layers, "
        f"vocab {args.vocab}, batch {args.batch}x{args.seq}, {modules} modules; one fp32 forward: {one:.3f} s"
    )
    for dtype in (torch.bfloat16, torch.float16):
        start = time.perf_counter()
        sens = mpdiag.sensitivity(model, loss, ids, dtype)
        measured = time.perf_counter() - start
        start = time.perf_counter()
        answer = sens.keep_fp32()
        searched = time.perf_counter() - start
        print(
            f"{sens.dtype}: sensitivity {measured:.2f} s = {measured / one:.1f} forwards ({sens.passes} passes); "
            f"keep_fp32 {searched:.2f} s = {searched / one:.1f} forwards ({answer.passes} passes); "
            f"loss error {sens.loss_error:.1e}; answer: {answer.names}"
        )


if __name__ == "__main__":
    main()
