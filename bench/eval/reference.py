"""Baseline for bench-eval: OpenFlamingo's own evaluation (evaluate.py's
evaluate_captioning) of 4-shot captioning with RICES demonstrations, on a
tiny random model written in the released formats (model.toml, clip.bin,
lm/, checkpoint.pt, by model/tests/reference/released_format_reference.py)
and a synthetic COCO in Karpathy's layout that bench-eval wrote.

The model side is what OpenFlamingo's EvalModel does (open_clip transform,
left-padded tokenizer with max_length 2000, Flamingo.generate with 3 beams,
20 new tokens, length penalty 0, new tokens decoded without special
tokens), plus use_cache=True, which transformers 4.57 otherwise drops when
pad != eos. RICES features of the training split are computed before the
clock starts; CIDEr (Java) is not timed (bench-eval does not time its
metric either). Prints one JSON line: seconds, samples and captions.

usage: python reference.py OUT_DIR DATA_DIR THREADS
"""

import json
import os
import sys
import time
import types

import torch
import torch.distributed as dist
from open_clip.transform import image_transform
from open_clip.transformer import QuickGELU, VisionTransformer

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "../../model/tests/reference"))
from released_format_reference import build  # noqa: E402

import open_flamingo.eval as eval_package  # noqa: E402

sys.path.insert(0, os.path.dirname(eval_package.__file__))
# The OK-VQA stemmer needs NLTK data that cannot be fetched; captioning never uses it.
sys.modules["ok_vqa_utils"] = types.SimpleNamespace(postprocess_ok_vqa_generation=lambda text: text)
import evaluate  # noqa: E402
from rices import RICES  # noqa: E402


class EvalModel:
    """OpenFlamingo's EvalModel for captioning, on an already built model."""

    def __init__(self, model, tokenizer, image_size):
        self.model = model
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.image_processor = image_transform(image_size, is_train=False)
        self.device = "cpu"
        self.captions = []

    def get_caption_prompt(self, caption=None):
        return f"<image>Output:{caption if caption is not None else ''}" \
               f"{'<|endofchunk|>' if caption is not None else ''}"

    def _prepare_images(self, batch):
        longest = max(len(images) for images in batch)
        vision_x = None
        for row, images in enumerate(batch):
            for slot, image in enumerate(images):
                pixels = self.image_processor(image)
                if vision_x is None:
                    vision_x = torch.zeros((len(batch), longest, 1) + pixels.shape, dtype=pixels.dtype)
                vision_x[row, slot, 0] = pixels
        return vision_x

    def get_outputs(self, batch_text, batch_images, min_generation_length, max_generation_length,
                    num_beams, length_penalty):
        encodings = self.tokenizer(batch_text, padding="longest", truncation=True, return_tensors="pt",
                                   max_length=2000)
        input_ids, attention_mask = encodings["input_ids"], encodings["attention_mask"].bool()
        with torch.inference_mode():
            outputs = self.model.generate(self._prepare_images(batch_images), input_ids, attention_mask,
                                          min_new_tokens=min_generation_length,
                                          max_new_tokens=max_generation_length, num_beams=num_beams,
                                          length_penalty=length_penalty,
                                          pad_token_id=self.tokenizer.pad_token_id, use_cache=True)
        texts = self.tokenizer.batch_decode(outputs[:, len(input_ids[0]):], skip_special_tokens=True)
        self.captions.extend(texts)
        return texts


def rices_class(out):
    with open(os.path.join(out, "clip.json")) as file:
        config = json.load(file)
    vision = config["vision_cfg"]
    visual = VisionTransformer(image_size=vision["image_size"], patch_size=vision["patch_size"],
                               width=vision["width"], layers=vision["layers"],
                               heads=vision["width"] // vision["head_width"], mlp_ratio=4.0,
                               output_dim=config["embed_dim"], act_layer=QuickGELU)
    state = torch.load(os.path.join(out, "clip.bin"), map_location="cpu")
    visual.load_state_dict({k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")})
    visual.eval()
    clip = types.SimpleNamespace(eval=lambda: None, encode_image=visual)
    processor = image_transform(vision["image_size"], is_train=False)

    class TinyRices(RICES):
        def __init__(self, dataset, device, batch_size, cached_features=None, **kwargs):
            self.dataset = dataset
            self.device = device
            self.batch_size = batch_size
            self.model = clip
            self.image_processor = processor
            self.features = cached_features if cached_features is not None else self._precompute_features()

    return TinyRices, vision["image_size"]


def main():
    out, data, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(threads)
    # Four demonstrations and the query take a few hundred tokens.
    model, tokenizer, _ = build(out, max_seq_len=1024)
    dist.init_process_group("gloo", init_method="file://" + os.path.join(out, "rendezvous"), rank=0,
                            world_size=1)
    tiny_rices, image_size = rices_class(out)
    evaluate.RICES = tiny_rices
    evaluate.compute_cider = lambda **kwargs: {"CIDEr": 0.0}
    d = lambda *parts: os.path.join(data, *parts)  # noqa: E731
    args = types.SimpleNamespace(
        model="open_flamingo", num_samples=-1, batch_size=8, rices=True, query_set_size=2048, rank=0,
        world_size=1, rices_vision_encoder_path=None, rices_vision_encoder_pretrained=None,
        coco_train_image_dir_path=d("train2014"), coco_val_image_dir_path=d("val2014"),
        coco_karpathy_json_path=d("dataset_coco.json"), coco_annotations_json_path=None)
    train = evaluate.CaptionDataset(d("train2014"), d("dataset_coco.json"), True, "coco", d("val2014"))
    features = tiny_rices(train, "cpu", 8).features
    eval_model = EvalModel(model, tokenizer, image_size)
    started = time.perf_counter()
    evaluate.evaluate_captioning(args, eval_model, seed=42, num_shots=4, dataset_name="coco",
                                 cached_features=features)
    seconds = time.perf_counter() - started
    dist.destroy_process_group()
    print(json.dumps({"seconds": seconds, "samples": len(eval_model.captions),
                      "captions": sorted(eval_model.captions)}))


if __name__ == "__main__":
    main()
