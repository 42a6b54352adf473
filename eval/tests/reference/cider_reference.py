"""pycocoevalcap's PTBTokenizer and Cider scorer (as OpenFlamingo's
coco_metric.py runs them through COCOEvalCap) on <dir>/captions.json:
{"images": [{"id", "candidate", "references": [...]}]}. Writes
<dir>/reference.json with the tokenised captions and the scores."""

import json
import sys
from pathlib import Path

from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

folder = Path(sys.argv[1])
images = json.loads((folder / "captions.json").read_text())["images"]
gts = {image["id"]: [{"caption": c} for c in image["references"]] for image in images}
res = {image["id"]: [{"caption": image["candidate"]}] for image in images}
tokenizer = PTBTokenizer()
gts = tokenizer.tokenize(gts)
res = tokenizer.tokenize(res)
overall, per_image = Cider().compute_score(gts, res)
(folder / "reference.json").write_text(
    json.dumps(
        {
            "references": {str(k): v for k, v in gts.items()},
            "candidates": {str(k): v[0] for k, v in res.items()},
            "order": [str(k) for k in gts.keys()],
            "overall": float(overall),
            "per_image": [float(s) for s in per_image],
        }
    )
)
