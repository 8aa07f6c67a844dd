"""The lean loss's fused head alone: row chunks against vocabulary blocks, forward + backward.

    python bench/fused_head.py                          # the default shapes, 3 repeats, 2 threads
    python bench/fused_head.py --shapes 256000x256x600 --repeats 5

Each shape is `vocab x hidden x labelled rows`, with `:frozen` for a head without a weight gradient
(LoRA). Both walks run in this one process, alternating, on the same tensors; the table gives the
median seconds of each and which one `fused_plan` picks. The last line is JSON: per shape,
`blocks_over_chunks` (the time ratio; below 1, vocabulary blocks are faster). Not timed in CI.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from component.training import loss as lean

DEFAULT_SHAPES = ("256000x256x600", "49152x256x3000", "49152x576x2000", "49152x576x2000:frozen")
"""The 256k benchmark model's head; the tiny Llama's; SmolLM2-135M's, full and under LoRA."""


def parse_shape(text: str) -> tuple[int, int, int, bool]:
    dims, _, mode = text.partition(":")
    vocab, hidden, rows = (int(x) for x in dims.split("x"))
    return vocab, hidden, rows, mode == "frozen"


def one_step(method, size, hidden, weight, targets) -> float:
    h = hidden.detach().requires_grad_()
    weight.grad = None
    start = time.perf_counter()
    lean._FusedHeadCrossEntropy.apply(h, weight, None, targets, None, (method, size), True).backward()
    return time.perf_counter() - start


def run(shape: str, repeats: int) -> dict:
    vocab, width, rows, frozen = parse_shape(shape)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, width, generator=g)
    weight = (torch.randn(vocab, width, generator=g) * 0.02).requires_grad_(not frozen)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    device = torch.device("cpu")
    chunk_rows = max(1, lean.LOGITS_CHUNK_ELEMENTS // vocab)
    columns = max(lean.MIN_BLOCK_COLUMNS, lean.CPU_BLOCK_ELEMENTS // rows)
    walks = {"row chunks": (lean._row_chunks, chunk_rows), "vocabulary blocks": (lean._vocab_blocks, columns)}
    times = {name: [] for name in walks}
    one_step(*walks["row chunks"], hidden, weight, targets)  # warm-up
    for _ in range(repeats):
        for name, (method, size) in walks.items():
            times[name].append(one_step(method, size, hidden, weight, targets))
    picked = lean.fused_plan(rows, vocab, device, weight_grad=not frozen)[0]
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {
        "shape": shape,
        "row chunks": medians["row chunks"],
        "vocabulary blocks": medians["vocabulary blocks"],
        "picked": "row chunks" if picked is lean._row_chunks else "vocabulary blocks",
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [run(shape, args.repeats) for shape in args.shapes.split(",")]
    print("| shape (vocab x hidden x rows) | row chunks (s) | vocabulary blocks (s) | fused_plan picks |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['shape']} | {r['row chunks']:.3f} | {r['vocabulary blocks']:.3f} | {r['picked']} |")
    print(
        json.dumps(
            {r["shape"]: {"blocks_over_chunks": round(r["vocabulary blocks"] / r["row chunks"], 3)} for r in results}
        )
    )


if __name__ == "__main__":
    main()
