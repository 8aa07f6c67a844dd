"""lm-eval benchmarks, before/after comparisons and samples (component/inference/benchmarks.py, samples.py).

The local multiple-choice task's accuracy must equal the one computed here from the model's own
log-likelihoods, through the adapter and through the merged model, with every prompt the harness
builds equal to our template's rendering; the baseline run must be the base model's scores; and each
user mistake (an unknown task, lm-eval missing, bad data lines) exits 2 with a message before any
model loads.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from component.data.template import Message, generation_prompt
from component.inference import benchmarks as bm
from component.inference.generation import ModelSource, generate, load_for_inference
from component.inference.samples import SAMPLES_FILE, table_cell
from component.runner import run
from script import evaluate, merge_lora
from tests.conftest import base_config, write_config
from tests.runs import load_config

pytest.importorskip("lm_eval", reason="lm-eval is a pinned optional dependency (requirements-dev.txt)")

MC_TASK, GEN_TASK = "ft_facts_mc", "ft_facts_gen"
MC_DATA = bm.LOCAL_TASKS_DIR / "facts_mc.jsonl"
PROMPTS = bm.LOCAL_TASKS_DIR / "prompts.jsonl"
ACC = "acc,none"
PPL_TASK, PPL = "ft_facts_ppl", "perplexity,none"
PPL_METRIC = "metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false"
EXACT_MATCH = "exact_match,strip"
LOGLIK_TOLERANCE = 1e-4  # batched and padded in the harness, one sequence at a time here
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama_dir) -> dict[str, Path]:
    """A LoRA run on the tiny model and its merged output."""
    root = tmp_path_factory.mktemp("bench")
    values = base_config(tiny_llama_dir, root / "lora", max_steps=6, max_prompt_length=64)
    run(load_config(["--train_args_file", str(write_config(root / "lora.json", **values))]))
    assert (
        merge_lora.main(["--adapter_dir", str(root / "lora"), "--output_dir", str(root / "merged"), "--dtype", "fp32"])
        == 0
    )
    return {"adapter": root / "lora", "merged": root / "merged"}


def mc_docs() -> list[dict]:
    return [json.loads(line) for line in MC_DATA.read_text().splitlines()]


def continuation_loglik(loaded, context: str, continuation: str) -> float:
    """log P(continuation | context), tokenized as a whole and split after the context's tokens."""
    tok = loaded.tokenizer
    ctx = tok(context, add_special_tokens=False).input_ids
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    assert whole[: len(ctx)] == ctx  # the context's tokens do not change when the choice follows
    with torch.no_grad():
        logits = loaded.model(input_ids=torch.tensor([whole])).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    return sum(float(logprobs[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


def hand_scores(loaded) -> tuple[float, list[list[float]], list[str]]:
    """Accuracy, per-choice log-likelihoods and prompts, computed here from the model itself."""
    logliks, prompts, correct = [], [], 0
    for doc in mc_docs():
        prompt = generation_prompt(loaded.template, loaded.tokenizer, [Message("user", doc["question"])])
        scores = [continuation_loglik(loaded, prompt, choice) for choice in doc["choices"]]
        correct += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
        logliks.append(scores)
        prompts.append(prompt)
    return correct / len(logliks), logliks, prompts


@pytest.mark.parametrize("kind", ["adapter", "merged"])
def test_mc_accuracy_is_the_hand_computed_one(runs, tiny_llama_dir, kind):
    loaded = load_for_inference(str(runs[kind]))
    result = bm.run_benchmarks(loaded, bm.plan_tasks([MC_TASK]))
    acc, logliks, prompts = hand_scores(loaded)
    assert result.results[MC_TASK][ACC] == acc
    samples = sorted(result.samples[MC_TASK], key=lambda s: s["doc_id"])
    assert len(samples) == len(logliks) == result.examples[MC_TASK]
    for sample, expected, prompt in zip(samples, logliks, prompts, strict=True):
        assert {context for context, _ in sample["arguments"]} == {prompt}  # our template, exactly
        assert [choice for _, choice in sample["arguments"]] == sample["doc"]["choices"]  # no delimiter added
        got = [resp[0][0] for resp in sample["resps"]]
        assert got == pytest.approx(expected, abs=LOGLIK_TOLERANCE)
    # The run's weights are the ones scored: the base model's log-likelihoods differ.
    _, base_logliks, _ = hand_scores(load_for_inference(str(tiny_llama_dir), template_name="chatml"))
    assert (
        max(abs(a - b) for da, db in zip(logliks, base_logliks, strict=True) for a, b in zip(da, db, strict=True))
        > 1e-2
    )


def test_few_shot_examples_are_earlier_turns_of_our_template(runs):
    loaded = load_for_inference(str(runs["adapter"]))
    result = bm.run_benchmarks(loaded, bm.plan_tasks([MC_TASK]), limit=3, num_fewshot=1)
    docs = mc_docs()
    for sample in result.samples[MC_TASK]:
        doc = sample["doc"]
        context = sample["arguments"][0][0]
        shots = [
            d
            for d in docs
            if d != doc
            and context
            == generation_prompt(
                loaded.template,
                loaded.tokenizer,
                [
                    Message("user", d["question"]),
                    Message("assistant", d["choices"][d["answer"]]),
                    Message("user", doc["question"]),
                ],
            )
        ]
        assert len(shots) == 1, context


def test_harness_prompt_continues_a_started_reply(runs):
    """lm-eval's gen_prefix ("Answer:") arrives as a last assistant message, which the prompt continues."""
    loaded = load_for_inference(str(runs["adapter"]))
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}]
    prompt = generation_prompt(loaded.template, loaded.tokenizer, [Message(**m) for m in history])
    assert bm.harness_prompt(loaded, history) == prompt
    assert (
        bm.harness_prompt(loaded, [*history, {"role": "assistant", "content": "Answer:"}], False) == prompt + "Answer:"
    )


def test_generation_task_stops_at_the_templates_end_of_turn(runs):
    loaded = load_for_inference(str(runs["adapter"]))
    result = bm.run_benchmarks(loaded, bm.plan_tasks([GEN_TASK]), limit=4)
    stop = loaded.template.stop_text(loaded.tokenizer)
    for sample in result.samples[GEN_TASK]:
        context, kwargs = sample["arguments"][0]
        assert context == generation_prompt(
            loaded.template, loaded.tokenizer, [Message("user", sample["doc"]["question"])]
        )
        assert stop in kwargs["until"]
        assert stop not in sample["resps"][0][0] and "\n" not in sample["resps"][0][0]
    assert 0.0 <= result.results[GEN_TASK][EXACT_MATCH] <= 1.0


def perplexity_task(folder: Path) -> Path:
    """A local task whose score is continuous (the gold answers' perplexity), so that base and tuned differ."""
    folder.mkdir()
    yaml_text = (bm.LOCAL_TASKS_DIR / "facts_mc.yaml").read_text().replace(MC_TASK, PPL_TASK)
    yaml_text = yaml_text.replace("output_type: multiple_choice", "output_type: loglikelihood")
    yaml_text = yaml_text.replace('doc_to_choice: "{{choices}}"\n', "").replace(
        "doc_to_target: answer", 'doc_to_target: "{{choices[answer]}}"'
    )
    yaml_text = yaml_text.replace("metric: acc\n    aggregation: mean\n    higher_is_better: true", PPL_METRIC)
    (folder / "ppl.yaml").write_text(yaml_text)
    shutil.copy(MC_DATA, folder / MC_DATA.name)
    return folder


def test_baseline_scores_both_with_deltas_plot_and_report(runs, tiny_llama_dir, tmp_path):
    run_dir = Path(shutil.copytree(runs["adapter"], tmp_path / "run"))
    tasks = perplexity_task(tmp_path / "tasks")
    names = [MC_TASK, GEN_TASK, PPL_TASK]
    out = tmp_path / "metrics.json"
    argv = ["--model", str(run_dir), "--tasks", ",".join(names), "--task_dir", str(tasks), "--limit", "6"]
    assert evaluate.main([*argv, "--baseline", str(tiny_llama_dir), "--output_json", str(out)]) == 0
    results = json.loads((run_dir / bm.RESULTS_FILE).read_text())
    plan = bm.plan_tasks(names, [tasks])
    tuned = bm.run_benchmarks(load_for_inference(str(run_dir)), plan, limit=6)
    base = bm.run_benchmarks(load_for_inference(str(tiny_llama_dir), template_name="chatml"), plan, limit=6)
    assert tuned.results[PPL_TASK][PPL] != pytest.approx(base.results[PPL_TASK][PPL], rel=1e-3)  # tells them apart
    for got, expected in ((results["results"], tuned.results), (results["baseline"]["results"], base.results)):
        assert got.keys() == expected.keys()
        for task in names:
            assert got[task] == pytest.approx(expected[task], rel=1e-5)
    assert results["baseline"]["model"] == str(tiny_llama_dir)
    for task in names:
        for metric, delta in results["deltas"][task].items():
            assert delta == pytest.approx(tuned.results[task][metric] - base.results[task][metric], rel=1e-5)
    assert results["examples"] == dict.fromkeys(names, 6)
    assert (run_dir / bm.PLOT_FILE).read_bytes()[:8] == PNG_MAGIC
    report = json.loads((run_dir / "report.json").read_text())
    assert report["benchmarks"] == results and report["status"] == "finished"  # the run's report, extended
    assert json.loads(out.read_text())["benchmarks"] == results


def test_samples_md_puts_base_beside_fine_tuned(runs, tiny_llama_dir, tmp_path):
    argv = ["--model", str(runs["merged"]), "--eval_prompts", str(PROMPTS), "--max_new_tokens", "6"]
    assert evaluate.main([*argv, "--output_dir", str(tmp_path / "a")]) == 0
    assert evaluate.main([*argv, "--output_dir", str(tmp_path / "b")]) == 0
    text = (tmp_path / "a" / SAMPLES_FILE).read_text()
    assert text == (tmp_path / "b" / SAMPLES_FILE).read_text()  # greedy, and seeded: reproducible
    prompts = [json.loads(line)["messages"] for line in PROMPTS.read_text().splitlines()]
    sections = text.split("\n## ")[1:]
    assert len(sections) == len(prompts)
    assert f"base: `{tiny_llama_dir}`" in text  # the merged model's recorded base
    tuned, base = (
        load_for_inference(str(runs["merged"])),
        load_for_inference(str(tiny_llama_dir), template_name="chatml"),
    )
    differ = 0
    for section, messages in zip(sections, prompts, strict=True):
        assert messages[-1]["content"] in section
        rows = [line for line in section.splitlines() if line.startswith("| greedy")]
        msgs = [Message(**m) for m in messages]
        cells = rows[0].split(" | ")
        assert cells[1] == cell(base, msgs) and cells[2].removesuffix(" |") == cell(tuned, msgs)
        differ += cells[1] != cells[2]
    assert differ  # the columns are two models


def cell(loaded, messages) -> str:
    return table_cell("".join(generate(loaded, messages, max_new_tokens=6)).strip())


# ---------------------------------------------------------------- errors: exit 2, a message, no model loaded


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(self):
        raise AssertionError("a model was loaded before the mistake was reported")

    monkeypatch.setattr(ModelSource, "load", refuse)


def test_unknown_task_names_the_closest(runs, capsys, no_model_load):
    assert evaluate.main(["--model", str(runs["adapter"]), "--tasks", f"{MC_TASK}q"]) == 2
    err = capsys.readouterr().err
    assert f"unknown task '{MC_TASK}q' (did you mean '{MC_TASK}'" in err and "Traceback" not in err


def test_lm_eval_not_installed_says_how_to_install(runs, monkeypatch, capsys, no_model_load):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    assert evaluate.main(["--model", str(runs["adapter"]), "--tasks", MC_TASK]) == 2
    err = capsys.readouterr().err
    assert f"pip install {bm.LM_EVAL_REQUIREMENT}" in err and "Traceback" not in err


def test_bad_lines_of_a_local_task_are_listed(runs, tmp_path, capsys, no_model_load):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mine.yaml").write_text((bm.LOCAL_TASKS_DIR / "facts_mc.yaml").read_text().replace(MC_TASK, "mine"))
    good = MC_DATA.read_text().splitlines()[0]
    lines = [
        good,
        "{not json",
        '{"question": "Q?", "choices": ["a", "b"]}',
        '{"question": "Q?", "choices": ["a", "b"], "answer": 2}',
    ]
    (tasks / "facts_mc.jsonl").write_text("\n".join(lines) + "\n")
    assert evaluate.main(["--model", str(runs["adapter"]), "--tasks", "mine", "--task_dir", str(tasks)]) == 2
    err = capsys.readouterr().err
    data = tasks / "facts_mc.jsonl"
    assert f"{data}: 3 invalid lines" in err
    assert f"{data}:2: invalid JSON" in err
    assert f"{data}:3: missing field 'answer'" in err
    assert f"{data}:4: 'answer' must be the index of a choice (0 to 1)" in err


def test_bad_lines_of_a_prompts_file_are_listed(runs, tmp_path, capsys, no_model_load):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text(PROMPTS.read_text().splitlines()[0] + '\n{"messages": [{"role": "robot", "content": "hi"}]}\n')
    assert evaluate.main(["--model", str(runs["adapter"]), "--eval_prompts", str(bad)]) == 2
    assert f"{bad}:2:" in capsys.readouterr().err


def test_eval_tasks_and_prompts_run_when_training_ends(tmp_path, tiny_llama_dir, capfd):
    import json as _json

    from component.cli import main_train
    from tests.conftest import base_config, write_config

    out = tmp_path / "out"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(_json.dumps({"messages": [{"role": "user", "content": "What is two plus two?"}]}) + "\n")
    values = base_config(tiny_llama_dir, out, max_steps=2, eval_tasks=["ft_facts_mc"], eval_prompts=str(prompts))
    assert main_train(["--train_args_file", str(write_config(tmp_path / "c.json", **values))]) == 0
    results = _json.loads((out / "eval_results.json").read_text())
    assert "ft_facts_mc" in _json.dumps(results)
    assert (out / "samples.md").is_file() and "What is two plus two?" in (out / "samples.md").read_text()
    assert "benchmarks" in _json.loads((out / "report.json").read_text())


def test_an_unknown_eval_task_stops_before_training(tmp_path, tiny_llama_dir, capfd):
    from component.cli import main_train
    from tests.conftest import base_config, write_config

    out = tmp_path / "out"
    values = base_config(tiny_llama_dir, out, max_steps=2, eval_tasks=["ft_facts_mcq"])
    assert main_train(["--train_args_file", str(write_config(tmp_path / "c.json", **values))]) == 2
    assert "ft_facts_mc" in capfd.readouterr().err and not out.exists()
