"""Dataset sources and mixtures (component/data/sources.py, mixing.py): every local source type and
a Hub id (read offline from datasets' own cache) give the same records; `columns` renames; bad
records are `file:line` or `path:index`; weights 0.8/0.2 realise within 3%; a mixture trains
exactly like itself under gradient accumulation; bad input exits 2 before output_dir exists.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from datasets import Dataset, DatasetDict

from component.cli import main_train
from component.config import CONFIG_FILE_FLAG
from component.data.mixing import mix, resize
from component.data.sft import build_sft_mixture, read_checked, read_conversations, read_dataset
from component.data.sources import DatasetSpec
from component.data.template_registry import get_template
from component.errors import USER_ERROR_EXIT_CODE, ConfigError, DataError
from tests.conftest import TINY_SFT, base_config, write_config
from tests.runs import config_of, trainer_losses
from tests.runs import train as train_values
from tests.tiny import tiny_tokenizer

ROWS = [json.loads(line) for line in TINY_SFT.read_text().splitlines() if line.strip()]
# One schema for tabular files (Dataset.from_list takes its columns from the first row): null where
# a record has no system prompt, which the readers drop again.
TABLE_ROWS = [{"system": r.get("system"), **r} for r in ROWS]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def records(path: str, **spec) -> list[dict]:
    read = read_dataset(DatasetSpec(path, **spec))
    assert not read.problems, read.problems
    return read.records


@pytest.fixture(scope="module")
def reference() -> list[dict]:
    return records(str(TINY_SFT))


# ---------------------------------------------------------------- sources


def test_every_local_source_type_reads_the_same_records(tmp_path, reference):
    (tmp_path / "list.json").write_text(json.dumps(ROWS))
    write_jsonl(tmp_path / "lines.json", ROWS)
    Dataset.from_list(TABLE_ROWS).to_parquet(str(tmp_path / "d.parquet"))
    Dataset.from_list(TABLE_ROWS).save_to_disk(str(tmp_path / "saved"))
    DatasetDict({"train": Dataset.from_list(TABLE_ROWS), "test": Dataset.from_list(TABLE_ROWS[:2])}).save_to_disk(
        str(tmp_path / "saved_dict")
    )
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", ROWS[:3])
    Dataset.from_list(TABLE_ROWS[3:]).to_parquet(str(folder / "b.parquet"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    for path in ("list.json", "lines.json", "d.parquet", "saved", "saved_dict", "folder", arrow):
        assert records(str(tmp_path / path)) == reference, path
    assert records(str(tmp_path / "saved_dict"), split="test") == reference[:2]


def build_hub_cache(cache: Path, repo_id: str, rows: list[dict], tmp_path: Path) -> None:
    """What datasets leaves in its cache after downloading `repo_id`, built from a local Parquet file
    with datasets' own Parquet builder: offline, load_dataset(repo_id) reads it back."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    source = tmp_path / "hub_source.parquet"
    Dataset.from_list(rows).to_parquet(str(source))
    namespace, name = repo_id.split("/")
    builder = Parquet(
        cache_dir=str(cache), dataset_name=name, config_id="default", hash="0123abcd", data_files=[str(source)]
    )
    builder.download_and_prepare()
    (cache / name).rename(cache / f"{namespace}___{name}")  # the folder a Hub download is cached in


def test_a_hub_id_loads_through_load_dataset_offline(tmp_path, monkeypatch, reference):
    assert datasets.config.HF_DATASETS_OFFLINE
    cache = tmp_path / "cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    build_hub_cache(cache, "someone/tiny-sft", TABLE_ROWS, tmp_path)
    assert records("someone/tiny-sft") == reference
    assert records("someone/tiny-sft", subset="default", split="train") == reference
    with pytest.raises(DataError, match=r"someone/missing: cannot load with datasets.load_dataset"):
        read_dataset(DatasetSpec("someone/missing"))


def test_columns_rename_a_source_to_the_format_keys(tmp_path):
    rows = [{"question": "What is two plus two?", "answer": "Four."}, {"question": "Hi", "answer": "Hello!"}]
    path = tmp_path / "qa.parquet"
    Dataset.from_list(rows).to_parquet(str(path))
    read = read_dataset(DatasetSpec(str(path), columns={"question": "prompt", "answer": "completion"}))
    assert read.formats == {str(path): "prompt_completion"}
    assert read.records[1] == {
        "system": None,
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    }
    bad = read_dataset(DatasetSpec(str(path), columns={"query": "prompt"}))
    assert str(bad.problems[0]).startswith(f"{path}:0: column(s) 'query' named in 'columns' not found")


def test_bad_records_are_located_by_index_or_line(tmp_path):
    good = ROWS[0]
    bad = {"conversation": [{"human": "Hi", "assistant": ""}]}
    Dataset.from_list([good, bad, good]).to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.json").write_text(json.dumps([good, good, bad]))
    write_jsonl(tmp_path / "d.jsonl", [good, "{broken"])
    located = [
        str(p)
        for name in ("d.parquet", "d.json", "d.jsonl")
        for p in read_dataset(DatasetSpec(str(tmp_path / name))).problems
    ]
    assert located == [
        f"{tmp_path / 'd.parquet'}:1: conversation[0].assistant: empty text",
        f"{tmp_path / 'd.json'}:2: conversation[0].assistant: empty text",
        f"{tmp_path / 'd.jsonl'}:2: invalid JSON: Expecting property name enclosed in double quotes (column 2)",
    ]
    specs = [DatasetSpec(str(tmp_path / "d.jsonl")), DatasetSpec(str(tmp_path / "d.parquet"))]
    with pytest.raises(DataError) as err:  # every dataset's problems, in one message
        read_checked(specs, skip_invalid=False, template=None)
    assert "d.jsonl:2: invalid JSON" in str(err.value) and "d.parquet:1: conversation[0]" in str(err.value)


def test_config_keys_of_dataset_lists_are_checked(tmp_path):
    out, model = tmp_path / "out", tmp_path / "model"
    values = base_config(model, out, train_file=None)
    values.pop("train_file")
    cases = {
        "datasets[0].pth': unknown key (did you mean 'path'?)": dict(datasets=[{"pth": "x.jsonl"}]),
        "datasets[0].path': required": dict(datasets=[{"format": "messages"}]),
        "keys 'train_file' and 'datasets' are both set": dict(datasets=[{"path": "x.jsonl"}], train_file="y.jsonl"),
        "datasets[1].weight': weights apply with mix_strategy 'interleave'": dict(
            datasets=[{"path": "x.jsonl"}, {"path": "y.jsonl", "weight": 0.2}]
        ),
        "datasets[1].weight': mix_strategy 'interleave' needs a positive weight": dict(
            datasets=[{"path": "x.jsonl", "weight": 1}, {"path": "y.jsonl"}], mix_strategy="interleave"
        ),
        "key 'datasets[0].train_on': 'last' is not one of": dict(datasets=[{"path": "x.jsonl", "train_on": "last"}]),
        "datasets[0].format': 'mesages' is not one of": dict(datasets=[{"path": "x.jsonl", "format": "mesages"}]),
        "key 'mix_strategy': 'interleaf' is not one of concatenate, interleave (did you mean 'interleave'?)": dict(
            datasets=[{"path": "x.jsonl"}], mix_strategy="interleaf"
        ),
        "eval_datasets[0].num_samples': expected a positive integer": dict(
            datasets=[{"path": "x.jsonl"}], eval_datasets=[{"path": "x.jsonl", "num_samples": 0}]
        ),
        "key 'train_file' is required (or a 'datasets' list": {},
    }
    for expected, extra in cases.items():
        with pytest.raises(ConfigError) as err:
            config_of({**values, **extra})
        assert expected in str(err.value), (expected, str(err.value))


# ---------------------------------------------------------------- mixing


def numbered(n: int, tag: str) -> list[dict]:
    return [{"instruction": f"{tag} question {i}", "output": f"{tag} answer {i}"} for i in range(n)]


def test_weights_0_8_0_2_realise_within_3_percent_and_repeat_for_a_seed(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", numbered(800, "a"))
    b = write_jsonl(
        tmp_path / "b.jsonl",
        [
            {"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}
            for r in numbered(1000, "b")
        ],
    )
    specs = [DatasetSpec(str(a), weight=0.8), DatasetSpec(str(b), weight=0.2)]
    tok, template = tiny_tokenizer(), get_template("chatml")

    def build(seed):
        return build_sft_mixture(specs, template, tok, 64, strategy="interleave", seed=seed)

    first, again = build(7), build(7)
    counts = [d.mixed_examples for d in first.summary.datasets]
    total = sum(counts)
    assert total == first.summary.examples == len(first.dataset) >= 990  # until a.jsonl runs out
    assert counts[0] == 800  # every example of the first is used, none twice
    shares = [d.share for d in first.summary.datasets]
    assert shares == [counts[0] / total, counts[1] / total]
    assert abs(shares[0] - 0.8) <= 0.03 and abs(shares[1] - 0.2) <= 0.03, counts
    assert [d.data_format for d in first.summary.datasets] == ["alpaca", "messages"]
    assert first.dataset["input_ids"] == again.dataset["input_ids"]
    assert build(8).dataset["input_ids"] != first.dataset["input_ids"]


def test_mix_counts_and_concatenate_keeps_order():
    a = Dataset.from_dict({"x": list(range(5))})
    b = Dataset.from_dict({"x": list(range(100, 103))})
    mixed = mix([a, b], "concatenate", seed=0)
    assert mixed.dataset["x"] == [0, 1, 2, 3, 4, 100, 101, 102] and mixed.counts == [5, 3]
    assert mixed.dataset.column_names == ["x"]


def test_num_samples_takes_the_first_n_or_up_samples_with_a_seeded_draw():
    d = Dataset.from_dict({"x": list(range(4))})
    assert resize(d, 3, seed=0)["x"] == [0, 1, 2]
    up = resize(d, 10, seed=0)["x"]
    assert up[:8] == [0, 1, 2, 3, 0, 1, 2, 3] and len(set(up[8:])) == 2 and up == resize(d, 10, seed=0)["x"]


# ---------------------------------------------------------------- training on a mixture


def mixture_files(tmp_path: Path) -> tuple[Path, Path]:
    """TINY_SFT split across two datasets in two formats: messages (JSONL) and sharegpt (Parquet)."""
    first = write_jsonl(
        tmp_path / "first.jsonl",
        [
            {
                "messages": [
                    m
                    for t in r["conversation"]
                    for m in ({"role": "user", "content": t["human"]}, {"role": "assistant", "content": t["assistant"]})
                ]
            }
            for r in ROWS[:5]
        ],
    )
    second = tmp_path / "second.parquet"
    Dataset.from_list(
        [
            {
                "conversations": [
                    m
                    for t in r["conversation"]
                    for m in ({"from": "human", "value": t["human"]}, {"from": "gpt", "value": t["assistant"]})
                ]
            }
            for r in ROWS[5:]
        ]
    ).to_parquet(str(second))
    return first, second


def mixture_config(model_dir: Path, out: Path, first: Path, second: Path, **overrides) -> dict:
    values = base_config(
        model_dir,
        out,
        datasets=[{"path": str(first), "weight": 0.5}, {"path": str(second), "weight": 0.5}],
        mix_strategy="interleave",
        mix_seed=3,
        **overrides,
    )
    values.pop("train_file")
    return values


def test_gradient_accumulation_invariance_on_a_mixture(tmp_path, tiny_llama_dir):
    """Batch 4 x accumulation 1 and batch 1 x accumulation 4 give the same loss and update on a mixture."""
    first, second = mixture_files(tmp_path)
    common = dict(max_steps=1, learning_rate=1e-2, lr_scheduler_type="constant", max_grad_norm=0.0, optim="sgd")
    runs = []
    for name, batch, accumulation in (("a", 4, 1), ("b", 1, 4)):
        values = mixture_config(
            tiny_llama_dir,
            tmp_path / name,
            first,
            second,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            **common,
        )
        runs.append(train_values(values))
    a, b = runs
    assert trainer_losses(a)[0] == pytest.approx(trainer_losses(b)[0], rel=1e-5)
    wa = {k: v for k, v in a.model.named_parameters() if v.requires_grad}
    wb = {k: v for k, v in b.model.named_parameters() if v.requires_grad}
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


def test_training_on_a_datasets_list_writes_each_share(tmp_path, tiny_llama_dir):
    first, second = mixture_files(tmp_path)
    out = tmp_path / "out"
    # Eval sets are concatenated whatever the train mixture (interleave here): every eval example is kept.
    evals = [{"path": str(first)}, {"path": str(second)}]
    values = mixture_config(tiny_llama_dir, out, first, second, max_steps=2, eval_datasets=evals)
    trainer = train_values(values)
    assert trainer_losses(trainer) and trainer.eval_dataset is not None
    records = sum(len(read_conversations(str(p)).records) for p in (first, second))
    assert len(trainer.eval_dataset) == records
    summary = json.loads((out / "data_summary.json").read_text())
    sources = summary["datasets"]
    assert [(s["path"], s["data_format"]) for s in sources] == [(str(first), "messages"), (str(second), "sharegpt")]
    assert sum(s["mixed_examples"] for s in sources) == summary["examples"]
    assert sum(s["share"] for s in sources) == pytest.approx(1.0)
    assert all(s["tokens"] > s["supervised_tokens"] > 0 for s in sources)


def test_a_bad_record_in_the_second_dataset_exits_2_before_output_dir(tmp_path, tiny_llama_dir, capfd):
    first, _ = mixture_files(tmp_path)
    second = tmp_path / "bad.parquet"
    Dataset.from_list([{"prompt": "Hi", "completion": "Hello"}, {"prompt": "Hi", "completion": ""}]).to_parquet(
        str(second)
    )
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.json", **mixture_config(tiny_llama_dir, out, first, second))
    assert main_train([CONFIG_FILE_FLAG, str(config)]) == USER_ERROR_EXIT_CODE
    err = capfd.readouterr().err
    assert f"{second}:1: completion: empty text" in err and "Traceback" not in err
    assert not out.exists()
