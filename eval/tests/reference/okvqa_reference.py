"""OK-VQA's stemming by OpenFlamingo's own eval/ok_vqa_utils.py on the
fixtures eval/tests/okvqa_parity.rs wrote to <dir>/fixtures.json, with NLTK's
WordNet lemmatizer reading Debian's WordNet 3.0 (wordnet-base and
wordnet-sense-index). Writes <dir>/reference.json.

Two stand-ins, both because NLTK's models are published only on GitHub:
- nltk.pos_tag tags a token NNS when the fixture's "plural" map says so,
  else NN (the Rust code's plural decision; everything else is checked);
- word_tokenize runs with preserve_line=True (no Punkt sentence model).
"""

import functools
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

folder = Path(sys.argv[1])
fixtures = json.loads((folder / "fixtures.json").read_text())

# NLTK reads WordNet only from under an nltk_data folder.
data = Path(tempfile.mkdtemp())
wordnet = data / "corpora" / "wordnet"
wordnet.mkdir(parents=True)
debian = Path(fixtures["wordnet_dir"])
for name in os.listdir(debian):
    if (debian / name).is_file():
        shutil.copy(debian / name, wordnet / name)
# The lexicographer files' names (Debian's package does not ship them; the
# lemmatizer does not use them, the reader wants the file).
lexnames = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact "
    "noun.attribute noun.body noun.cognition noun.communication noun.event "
    "noun.feeling noun.food noun.group noun.location noun.motive noun.object "
    "noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance "
    "noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social "
    "verb.stative verb.weather adj.ppl"
).split()
category = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}
(wordnet / "lexnames").write_text(
    "".join(f"{i:02d}\t{n}\t{category[n.split('.')[0]]}\n" for i, n in enumerate(lexnames))
)
os.environ["NLTK_DATA"] = str(data)

import inflection  # noqa: E402
import nltk  # noqa: E402
import open_flamingo.eval  # noqa: E402

sys.path.insert(0, os.path.dirname(open_flamingo.eval.__file__))
import ok_vqa_utils  # noqa: E402

plural = fixtures["plural"]


def pos_tag(tokens):
    return [(token, "NNS" if plural.get(token) else "NN") for token in tokens]


nltk.pos_tag = pos_tag
nltk.tokenize.word_tokenize = functools.partial(
    nltk.tokenize.word_tokenize, preserve_line=True
)

lemmatizer = nltk.stem.WordNetLemmatizer()
(folder / "reference.json").write_text(
    json.dumps(
        {
            "tokens": [nltk.tokenize.word_tokenize(t) for t in fixtures["texts"]],
            "stems": [ok_vqa_utils.postprocess_ok_vqa_generation(t) for t in fixtures["texts"]],
            "lemmas": [lemmatizer.lemmatize(w, "v") for w in fixtures["verbs"]],
            "singulars": [inflection.singularize(w) for w in fixtures["nouns"]],
        }
    )
)
