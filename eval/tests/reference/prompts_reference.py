"""Reference for tests/tests/eval.rs: the prompts OpenFlamingo's own
evaluation (open_flamingo/eval/evaluate.py: evaluate_captioning,
evaluate_vqa, evaluate_classification) builds with RICES demonstrations.

The evaluation functions run unchanged. What surrounds them is replaced:
- the model: a recorder that keeps every prompt and its images' file names
  (the prompt templates are reference §4.2's, as the OpenFlamingo EvalModel
  writes them) and returns a placeholder output;
- RICES's CLIP: the tiny model's open_clip tower (clip.json and
  clip.safetensors), loaded into open_clip's VisionTransformer with its
  eval transform, since nothing can be downloaded;
- the metrics (CIDEr, VQA accuracy, ROC-AUC), which the prompts do not
  depend on; and ok_vqa_utils, whose stemmer needs NLTK data that cannot be
  downloaded (post-processing does not affect prompts either).

usage: python prompts_reference.py MODEL_DIR OUT_JSON TASK:DATA_DIR:SHOTS[,SHOTS…] …
"""

import json
import os
import sys
import types

import torch
import torch.distributed as dist
from open_clip.transform import image_transform
from open_clip.transformer import QuickGELU, VisionTransformer
from safetensors.torch import load_file

import open_flamingo.eval as eval_package

EVAL_DIR = os.path.dirname(eval_package.__file__)
sys.path.insert(0, EVAL_DIR)
# The stemmer's NLTK data cannot be fetched here; prompts never reach it.
sys.modules["ok_vqa_utils"] = types.SimpleNamespace(postprocess_ok_vqa_generation=lambda text: text)

import evaluate  # noqa: E402
import utils  # noqa: E402
from rices import RICES  # noqa: E402

CURRENT_IDS = []


def recording_prepare_eval_samples(test_dataset, num_samples, batch_size):
    loader = ORIGINAL_PREPARE(test_dataset, num_samples, batch_size)

    class Recording:
        def __iter__(self):
            for batch in loader:
                key = next(k for k in ("image_id", "question_id", "id") if k in batch)
                CURRENT_IDS[:] = [str(i) for i in batch[key]]
                yield batch

        def __len__(self):
            return len(loader)

    return Recording()


ORIGINAL_PREPARE = utils.prepare_eval_samples
utils.prepare_eval_samples = recording_prepare_eval_samples


class Recorder:
    """Stands in for the OpenFlamingo EvalModel: records what it is asked."""

    def __init__(self):
        self.device = "cpu"
        self.prompts = {}

    def _record(self, batch_text, batch_images):
        assert len(batch_text) == len(CURRENT_IDS)
        for sample_id, text, images in zip(CURRENT_IDS, batch_text, batch_images):
            self.prompts[sample_id] = {"prompt": text,
                                       "images": [os.path.basename(image.filename) for image in images]}

    def get_outputs(self, batch_text, batch_images, **kwargs):
        self._record(batch_text, batch_images)
        return ["placeholder"] * len(batch_text)

    def get_rank_classifications(self, batch_text, batch_images, all_class_names, use_cache, normalize_length):
        self._record(batch_text, batch_images)
        return torch.zeros(len(batch_text), len(all_class_names))

    # Reference §4.2's templates (OpenFlamingo's eval/models/open_flamingo.py).
    def get_vqa_prompt(self, question, answer=None):
        return f"<image>Question:{question} Short answer:{answer if answer is not None else ''}" \
               f"{'<|endofchunk|>' if answer is not None else ''}"

    def get_caption_prompt(self, caption=None):
        return f"<image>Output:{caption if caption is not None else ''}" \
               f"{'<|endofchunk|>' if caption is not None else ''}"

    def get_hateful_memes_prompt(self, text, label=None):
        return f"<image>is an image with: '{text}' written on it. Is it hateful? Answer:" \
               f"{label if label is not None else ''}{'<|endofchunk|>' if label is not None else ''}"


class TinyClip:
    def __init__(self, model_dir):
        config = json.load(open(os.path.join(model_dir, "clip.json")))
        vision = config["vision_cfg"]
        self.visual = VisionTransformer(
            image_size=vision["image_size"], patch_size=vision["patch_size"], width=vision["width"],
            layers=vision["layers"], heads=vision["width"] // vision["head_width"], mlp_ratio=4.0,
            output_dim=config["embed_dim"], act_layer=QuickGELU)
        state = {k[len("visual."):]: v for k, v in load_file(os.path.join(model_dir, "clip.safetensors")).items()
                 if k.startswith("visual.")}
        self.visual.load_state_dict(state, strict=True)
        self.visual.eval()
        self.image_size = vision["image_size"]

    def eval(self):
        return self

    def encode_image(self, images):
        return self.visual(images)


def make_rices(model_dir):
    clip = TinyClip(model_dir)

    class TinyRices(RICES):
        def __init__(self, dataset, device, batch_size, cached_features=None, **kwargs):
            self.dataset = dataset
            self.device = device
            self.batch_size = batch_size
            self.model = clip
            self.image_processor = image_transform(clip.image_size, is_train=False)
            self.features = self._precompute_features()

    return TinyRices


def args_for(task, data_dir):
    d = lambda *parts: os.path.join(data_dir, *parts)  # noqa: E731
    return types.SimpleNamespace(
        model="open_flamingo", num_samples=-1, batch_size=4, rices=True, query_set_size=2048,
        rank=0, world_size=1, rices_vision_encoder_path=None, rices_vision_encoder_pretrained=None,
        coco_train_image_dir_path=d("train2014"), coco_val_image_dir_path=d("val2014"),
        coco_karpathy_json_path=d("dataset_coco.json"), coco_annotations_json_path=None,
        flickr_image_dir_path=d("flickr30k-images"), flickr_karpathy_json_path=d("dataset_flickr30k.json"),
        flickr_annotations_json_path=None,
        vqav2_train_image_dir_path=d("train2014"), vqav2_test_image_dir_path=d("val2014"),
        vqav2_train_questions_json_path=d("v2_OpenEnded_mscoco_train2014_questions.json"),
        vqav2_train_annotations_json_path=d("v2_mscoco_train2014_annotations.json"),
        vqav2_test_questions_json_path=d("v2_OpenEnded_mscoco_val2014_questions.json"),
        vqav2_test_annotations_json_path=d("v2_mscoco_val2014_annotations.json"),
        ok_vqa_train_image_dir_path=d("train2014"), ok_vqa_test_image_dir_path=d("val2014"),
        ok_vqa_train_questions_json_path=d("OpenEnded_mscoco_train2014_questions.json"),
        ok_vqa_train_annotations_json_path=d("mscoco_train2014_annotations.json"),
        ok_vqa_test_questions_json_path=d("OpenEnded_mscoco_val2014_questions.json"),
        ok_vqa_test_annotations_json_path=d("mscoco_val2014_annotations.json"),
        textvqa_image_dir_path=d("train_images"),
        textvqa_train_questions_json_path=d("train_questions_vqa_format.json"),
        textvqa_train_annotations_json_path=d("train_annotations_vqa_format.json"),
        textvqa_test_questions_json_path=d("val_questions_vqa_format.json"),
        textvqa_test_annotations_json_path=d("val_annotations_vqa_format.json"),
        vizwiz_train_image_dir_path=d("train"), vizwiz_test_image_dir_path=d("val"),
        vizwiz_train_questions_json_path=d("train_questions_vqa_format.json"),
        vizwiz_train_annotations_json_path=d("train_annotations_vqa_format.json"),
        vizwiz_test_questions_json_path=d("val_questions_vqa_format.json"),
        vizwiz_test_annotations_json_path=d("val_annotations_vqa_format.json"),
        hateful_memes_image_dir_path=d("img"),
        hateful_memes_train_annotations_json_path=d("train.json"),
        hateful_memes_test_annotations_json_path=d("dev.json"),
    )


def main():
    model_dir, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", init_method="file://" + os.path.abspath(out) + ".rendezvous", rank=0, world_size=1)
    evaluate.RICES = make_rices(model_dir)
    evaluate.compute_cider = lambda **kwargs: {"CIDEr": 0.0}
    evaluate.compute_vqa_accuracy = lambda *args, **kwargs: 0.0
    evaluate.roc_auc_score = lambda *args, **kwargs: 0.0
    results = {}
    for spec in sys.argv[3:]:
        task, data_dir, shots = spec.split(":")
        args = args_for(task, data_dir)
        for shot in [int(s) for s in shots.split(",")]:
            recorder = Recorder()
            if task in ("coco", "flickr30k"):
                evaluate.evaluate_captioning(args, recorder, seed=42, num_shots=shot,
                                             dataset_name="coco" if task == "coco" else "flickr")
            elif task == "hateful_memes":
                evaluate.evaluate_classification(args, recorder, seed=42, num_shots=shot,
                                                 dataset_name="hateful_memes")
            else:
                evaluate.evaluate_vqa(args, recorder, seed=42, num_shots=shot, dataset_name=task)
            results[f"{task}/{shot}"] = recorder.prompts
    dist.destroy_process_group()
    with open(out, "w") as file:
        json.dump(results, file, indent=1)


if __name__ == "__main__":
    main()
