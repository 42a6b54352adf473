//! Synthetic benchmarks in the real datasets' layouts (`flamingoctl data
//! synth-eval`): shapes scenes from `flamingo_data::synthetic` with captions,
//! questions about colour and shape, "red means hateful" memes, and shape
//! classes, for tests and demos.

use std::path::{Path, PathBuf};

use flamingo_data::synthetic::eval_scene;
use serde_json::json;

use crate::datasets::Task;
use crate::{EvalError, Result};

/// A split's name, its code in the scenes' keys, and its size.
type Splits = [(&'static str, u64, u64); 2];

/// Writes the synthetic benchmark for `task` under `out` in its real
/// layout: `train` training and `test` test examples of `size`-pixel
/// images drawn from `seed`.
pub fn write(task: Task, out: &Path, train: u64, test: u64, size: usize, seed: u64) -> Result<()> {
    let splits = [("train", 0u64, train), ("test", 1u64, test)];
    let scenes = Scenes { out, size, seed };
    match task {
        Task::Coco | Task::Flickr30k => scenes.captions(task, splits),
        Task::Vqav2 | Task::OkVqa | Task::Textvqa | Task::Vizwiz => scenes.vqa(task, splits),
        Task::HatefulMemes => scenes.memes(splits),
        Task::Imagenet => scenes.classes(splits),
    }
}

fn write_file(path: PathBuf, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|source| EvalError::Io {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    std::fs::write(&path, bytes).map_err(|source| EvalError::Io { path, source })
}

struct Scenes<'a> {
    out: &'a Path,
    size: usize,
    seed: u64,
}

impl Scenes<'_> {
    /// COCO and Flickr30K: Karpathy's split file and the images.
    fn captions(&self, task: Task, splits: Splits) -> Result<()> {
        let (out, size, seed) = (self.out, self.size, self.seed);
        let mut images = Vec::new();
        for (split, code, count) in splits {
            for index in 0..count {
                let (scene, png) = eval_scene(seed, code, index, size);
                let id = code * 1_000_000 + index;
                let (folder, filename) = if task == Task::Coco {
                    let folder = if split == "train" {
                        "train2014"
                    } else {
                        "val2014"
                    };
                    (folder.to_string(), format!("COCO_{folder}_{id:012}.jpg"))
                } else {
                    ("flickr30k-images".to_string(), format!("{id}.jpg"))
                };
                write_file(out.join(&folder).join(&filename), &png)?;
                let caption = scene.caption();
                images.push(json!({
                    "filepath": folder, "filename": filename, "split": split,
                    "cocoid": id, "imgid": images.len(),
                    "sentences": [{"raw": format!("{caption}."), "tokens": caption.split(' ').collect::<Vec<_>>()},
                                  {"raw": caption, "tokens": []}],
                }));
            }
        }
        let name = if task == Task::Coco {
            "dataset_coco.json"
        } else {
            "dataset_flickr30k.json"
        };
        let dataset = if task == Task::Coco {
            "coco"
        } else {
            "flickr30k"
        };
        write_file(
            out.join(name),
            json!({"images": images, "dataset": dataset})
                .to_string()
                .as_bytes(),
        )?;
        Ok(())
    }

    /// VQAv2, OK-VQA, TextVQA and VizWiz: questions and annotations in the
    /// VQA format, and the images.
    fn vqa(&self, task: Task, splits: Splits) -> Result<()> {
        let (out, size, seed) = (self.out, self.size, self.seed);
        for (split, code, count) in splits {
            let split = if split == "test" { "val" } else { split };
            let mut questions = Vec::new();
            let mut annotations = Vec::new();
            for index in 0..count {
                let (scene, png) = eval_scene(seed, code, index, size);
                let image_id = code * 1_000_000 + index;
                let question_id = image_id * 10;
                let (image_value, path, questions_name, annotations_name) = match task {
                    Task::Vqav2 => (
                        json!(image_id),
                        out.join(format!("{split}2014/COCO_{split}2014_{image_id:012}.jpg")),
                        format!("v2_OpenEnded_mscoco_{split}2014_questions.json"),
                        format!("v2_mscoco_{split}2014_annotations.json"),
                    ),
                    Task::OkVqa => (
                        json!(image_id),
                        out.join(format!("{split}2014/COCO_{split}2014_{image_id:012}.jpg")),
                        format!("OpenEnded_mscoco_{split}2014_questions.json"),
                        format!("mscoco_{split}2014_annotations.json"),
                    ),
                    Task::Textvqa => (
                        json!(format!("{image_id:016x}")),
                        out.join(format!("train_images/{image_id:016x}.jpg")),
                        format!("{split}_questions_vqa_format.json"),
                        format!("{split}_annotations_vqa_format.json"),
                    ),
                    _ => (
                        json!(format!("VizWiz_{split}_{image_id:08}.jpg")),
                        out.join(format!("{split}/VizWiz_{split}_{image_id:08}.jpg")),
                        format!("{split}_questions_vqa_format.json"),
                        format!("{split}_annotations_vqa_format.json"),
                    ),
                };
                write_file(path, &png)?;
                let (question, answer) = scene.question(index);
                questions.push(json!({"image_id": image_value, "question": question, "question_id": question_id}));
                let answers: Vec<_> = (1..=10)
                    .map(|n| {
                        let mut entry =
                            json!({"answer": answer, "answer_confidence": "yes", "answer_id": n});
                        // OK-VQA v1.1 keeps each answer raw and stemmed
                        // (shapes and colours stem to themselves).
                        if task == Task::OkVqa {
                            entry["raw_answer"] = json!(answer);
                        }
                        entry
                    })
                    .collect();
                annotations.push(json!({"question_id": question_id, "image_id": image_value,
                    "answers": answers, "multiple_choice_answer": answer,
                    "question_type": "what", "answer_type": "other"}));
                if index + 1 == count {
                    write_file(
                        out.join(&questions_name),
                        json!({"questions": questions}).to_string().as_bytes(),
                    )?;
                    write_file(
                        out.join(&annotations_name),
                        json!({"annotations": annotations}).to_string().as_bytes(),
                    )?;
                }
            }
        }
        Ok(())
    }

    /// HatefulMemes: JSON lines and the images; red means hateful.
    fn memes(&self, splits: Splits) -> Result<()> {
        let (out, size, seed) = (self.out, self.size, self.seed);
        for (split, code, count) in splits {
            let file = if split == "train" {
                "train.json"
            } else {
                "dev.json"
            };
            let mut lines = String::new();
            for index in 0..count {
                let (scene, png) = eval_scene(seed, code, index, size);
                let id = code * 100_000 + index;
                write_file(out.join(format!("img/{id:05}.png")), &png)?;
                lines.push_str(
                    &json!({"id": id, "img": format!("img/{id:05}.png"),
                    "label": u8::from(scene.has_red()), "text": scene.caption()})
                    .to_string(),
                );
                lines.push('\n');
            }
            write_file(out.join(file), lines.as_bytes())?;
        }
        Ok(())
    }

    /// ImageNet-style class folders named by the shapes.
    fn classes(&self, splits: Splits) -> Result<()> {
        let (out, size, seed) = (self.out, self.size, self.seed);
        for (split, code, count) in splits {
            let folder = if split == "train" { "train" } else { "val" };
            for index in 0..count {
                let (scene, png) = eval_scene(seed, code, index, size);
                write_file(
                    out.join(format!("{folder}/{}/{index:05}.png", scene.shape_name())),
                    &png,
                )?;
            }
        }
        Ok(())
    }
}
