"""The reference metrics on the fixtures eval/tests/metric_parity.rs wrote:
VQA accuracy with OpenFlamingo's eval/vqa_metric.py (VQA, VQAEval), ROC-AUC
with scikit-learn. Writes <dir>/reference.json."""

import contextlib
import io
import json
import sys
from pathlib import Path

from open_flamingo.eval.vqa_metric import VQA, VQAEval
from sklearn.metrics import roc_auc_score

folder = Path(sys.argv[1])
with contextlib.redirect_stdout(io.StringIO()):
    vqa = VQA(str(folder / "annotations.json"), str(folder / "questions.json"))
    results = vqa.loadRes(str(folder / "results.json"), str(folder / "questions.json"))
    evaluation = VQAEval(vqa, results, n=2)
    evaluation.evaluate()

roc = json.loads((folder / "roc.json").read_text())
aucs = [float(roc_auc_score(case["labels"], case["scores"])) for case in roc]

(folder / "reference.json").write_text(
    json.dumps(
        {
            "overall": evaluation.accuracy["overall"],
            "per_question": {str(k): v for k, v in evaluation.evalQA.items()},
            "roc_auc": aucs,
        }
    )
)
