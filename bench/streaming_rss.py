"""Peak memory and throughput of streaming pretraining data (`streaming: true`) over a large corpus.

    python bench/streaming_rss.py                          # a 2 GB corpus, one full pass
    python bench/streaming_rss.py --size_gb 0.2            # smaller
    python bench/streaming_rss.py --tokenizer models/SmolLM2-135M-Instruct.gguf --max_seq_length 2048

Writes a JSONL pretraining corpus of --size_gb into a temporary folder (under --work_dir, default
the system's; deleted afterwards): documents of 2 to 400 sentences of Zipf-distributed made-up words,
in --files files. Then streams one full pass through it as a training run reads it:
component.data.streaming.PackedStream -> torch DataLoader of --batch_size blocks -> PackedCollator,
and after each batch asks for the stream's position there, as each checkpoint does.

The tokenizer is a byte-level BPE of --vocab tokens trained in-process on the corpus's sentences, or
--tokenizer (a local folder or .gguf file). Prints one line per progress report, then the result as
JSON on the last line: corpus bytes, blocks, tokens, seconds, MB/s, tokens/s and peak RSS (this
process's ru_maxrss, corpus writing included). Exits 1 when peak RSS exceeds --max_rss_gb.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RSS_UNIT_BYTES = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: KiB on Linux, bytes on macOS
SYLLABLES = "ka lo mer tin sa vel dor pri an est qu ir ul om bra ste ni fo gen ta ri us ex cor".split()
POOL_SENTENCES = 20_000
SEED = 0


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RSS_UNIT_BYTES / 1e9


def sentence_pool(rng: np.random.Generator) -> list[str]:
    """Sentences of 4 to 30 made-up words; word frequencies follow Zipf's law, as in natural text."""
    words = ["".join(rng.choice(SYLLABLES, size=rng.integers(1, 5))) for _ in range(30_000)]
    ranks = np.minimum(rng.zipf(1.2, size=POOL_SENTENCES * 30), len(words)) - 1
    sentences, at = [], 0
    for _ in range(POOL_SENTENCES):
        n = int(rng.integers(4, 31))
        text = " ".join(words[i] for i in ranks[at : at + n])
        sentences.append(text[0].upper() + text[1:] + ".")
        at += n
    return sentences


def write_corpus(folder: Path, size_bytes: int, files: int, sentences: list[str], rng) -> tuple[int, int]:
    """JSONL files of {"text": ...} documents until `size_bytes` are written; returns (bytes, documents)."""
    handles = [open(folder / f"part-{i:03d}.jsonl", "w", encoding="utf-8") for i in range(files)]  # noqa: SIM115
    written = documents = 0
    try:
        while written < size_bytes:
            picks = rng.integers(0, len(sentences), size=int(rng.integers(2, 401)))
            line = json.dumps({"text": " ".join(sentences[i] for i in picks)}) + "\n"
            handles[documents % files].write(line)
            written += len(line)
            documents += 1
    finally:
        for h in handles:
            h.close()
    return written, documents


def load_tokenizer(path: str | None, sentences: list[str], vocab: int):
    if path:
        from transformers import AutoTokenizer

        p = Path(path)
        if p.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(p.resolve().parent), gguf_file=p.name)
        return AutoTokenizer.from_pretrained(path)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sentences, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def stream_one_pass(corpus: Path, tokenizer, max_len: int, batch_size: int, report_every_s: float) -> dict:
    """Every block of one pass, batched and collated as training would; the position asked after each batch."""
    import torch

    from component.data.packing import PackedCollator
    from component.data.streaming import PackedStream

    collator = PackedCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    stream = PackedStream(str(corpus), tokenizer, max_len)
    counts = {"blocks": 0, "tokens": 0}

    def collate(features):
        counts["tokens"] += sum(len(f["input_ids"]) for f in features)
        return collator(features)

    loader = torch.utils.data.DataLoader(stream, batch_size=batch_size, collate_fn=collate)
    start = last_report = time.perf_counter()
    for batch in loader:
        counts["blocks"] += len(batch["input_ids"])
        if stream.position(counts["blocks"]).epoch >= 1:  # the next block opens the second pass
            break
        now = time.perf_counter()
        if now - last_report >= report_every_s:
            last_report = now
            print(
                f"# {counts['blocks']} blocks, {counts['tokens'] / (now - start):,.0f} tokens/s, "
                f"peak RSS {peak_rss_gb():.2f} GB",
                flush=True,
            )
    return {**counts, "seconds": time.perf_counter() - start, "invalid_lines": stream.invalid_lines}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size_gb", type=float, default=2.0, help="corpus size to write, in GB (1e9 bytes)")
    p.add_argument("--files", type=int, default=8, help="JSONL files the corpus is split into")
    p.add_argument("--max_seq_length", type=int, default=1024)
    p.add_argument("--batch_size", type=int, default=8, help="blocks per batch")
    p.add_argument("--tokenizer", default=None, help="a tokenizer folder or .gguf file; default: a BPE trained here")
    p.add_argument("--vocab", type=int, default=32_000, help="vocabulary of the BPE trained here")
    p.add_argument("--work_dir", default=None, help="where the temporary corpus folder goes")
    p.add_argument("--max_rss_gb", type=float, default=3.0, help="exit 1 above this peak RSS")
    p.add_argument("--report_every_s", type=float, default=30.0)
    args = p.parse_args(argv)

    rng = np.random.default_rng(SEED)
    sentences = sentence_pool(rng)
    tokenizer = load_tokenizer(args.tokenizer, sentences, args.vocab)
    with tempfile.TemporaryDirectory(prefix="streaming-rss-", dir=args.work_dir) as tmp:
        t0 = time.perf_counter()
        written, documents = write_corpus(Path(tmp), int(args.size_gb * 1e9), args.files, sentences, rng)
        write_s = time.perf_counter() - t0
        print(f"# wrote {written / 1e9:.2f} GB ({documents:,} documents) in {write_s:.0f} s", flush=True)
        del sentences
        result = stream_one_pass(Path(tmp), tokenizer, args.max_seq_length, args.batch_size, args.report_every_s)
    peak = peak_rss_gb()
    summary = {
        "corpus_bytes": written,
        "documents": documents,
        "files": args.files,
        "max_seq_length": args.max_seq_length,
        "tokenizer": args.tokenizer or f"byte-level BPE, {len(tokenizer)} tokens",
        "write_s": round(write_s, 1),
        "stream_s": round(result["seconds"], 1),
        "blocks": result["blocks"],
        "tokens": result["tokens"],
        "mb_per_s": round(written / 1e6 / result["seconds"], 2),
        "tokens_per_s": round(result["tokens"] / result["seconds"]),
        "passes_completed": 1,
        "peak_rss_gb": round(peak, 3),
    }
    print(json.dumps(summary))
    if peak > args.max_rss_gb:
        print(f"# peak RSS {peak:.2f} GB exceeds --max_rss_gb {args.max_rss_gb}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
