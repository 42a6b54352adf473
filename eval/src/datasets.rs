//! The evaluation datasets, read from the files OpenFlamingo's evaluation
//! reads (reference §4.2), all under one `--data-dir`. Every missing file is
//! reported by path with what belongs there.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::EvalError;

use serde_json::Value;

mod vqa;
use vqa::{testdev_questions, vqa, Split};

/// The benchmarks of reference §4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum Task {
    Coco,
    Flickr30k,
    Vqav2,
    OkVqa,
    Textvqa,
    Vizwiz,
    HatefulMemes,
    Imagenet,
}

/// How a task is scored, which decides its prompt and its decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Captioning,
    Vqa,
    Classification,
}

impl Task {
    /// The name used in results files (OpenFlamingo's keys).
    pub fn name(self) -> &'static str {
        match self {
            Task::Coco => "coco",
            Task::Flickr30k => "flickr30",
            Task::Vqav2 => "vqav2",
            Task::OkVqa => "ok_vqa",
            Task::Textvqa => "textvqa",
            Task::Vizwiz => "vizwiz",
            Task::HatefulMemes => "hateful_memes",
            Task::Imagenet => "imagenet",
        }
    }

    pub fn kind(self) -> Kind {
        match self {
            Task::Coco | Task::Flickr30k => Kind::Captioning,
            Task::Vqav2 | Task::OkVqa | Task::Textvqa | Task::Vizwiz => Kind::Vqa,
            Task::HatefulMemes | Task::Imagenet => Kind::Classification,
        }
    }

    /// `max_new_tokens` as OpenFlamingo's evaluate.py sets it per task.
    pub fn max_new_tokens(self) -> i64 {
        match self {
            Task::Coco | Task::Flickr30k => 20,
            Task::Textvqa => 10,
            _ => 5,
        }
    }

    /// The files this task reads under the data dir, for `--help` and errors.
    pub fn layout(self) -> &'static str {
        match self {
            Task::Coco => "dataset_coco.json (Karpathy splits), train2014/ and val2014/ images (by each entry's filepath); captions_val2014.json is used for the CIDEr references when present, else the Karpathy sentences",
            Task::Flickr30k => "dataset_flickr30k.json (Karpathy splits), flickr30k-images/; dataset_flickr30k_coco_style.json is used for the references when present",
            Task::Vqav2 => "train2014/ and val2014/ (COCO_<split>_<id:012>.jpg), v2_OpenEnded_mscoco_{train,val}2014_questions.json, v2_mscoco_{train,val}2014_annotations.json",
            Task::OkVqa => "train2014/ and val2014/ (COCO_<split>_<id:012>.jpg), OpenEnded_mscoco_{train,val}2014_questions.json, mscoco_{train,val}2014_annotations.json",
            Task::Textvqa => "train_images/ (<image_id>.jpg), {train,val}_questions_vqa_format.json, {train,val}_annotations_vqa_format.json",
            Task::Vizwiz => "train/ and val/ (by image_id), {train,val}_questions_vqa_format.json, {train,val}_annotations_vqa_format.json",
            Task::HatefulMemes => "img/, train.json and dev.json (JSON lines: id, img, label, text)",
            Task::Imagenet => "train/<class>/ and val/<class>/ image folders (classes in sorted folder order); classnames.txt (one name per line, in that order) when the folder names are not the class names (ImageNet-1k's 1000 synset folders get OpenFlamingo's class names without it)",
        }
    }

    /// The files `--testdev` reads besides the training split, for the
    /// tasks with an EvalAI test-dev set.
    pub fn testdev_layout(self) -> Option<&'static str> {
        match self {
            Task::Vqav2 => Some("test2015/ (COCO_test2015_<id:012>.jpg), v2_OpenEnded_mscoco_test-dev2015_questions.json (the questions to answer), v2_OpenEnded_mscoco_test2015_questions.json (all test questions, each needs an answer)"),
            Task::Vizwiz => Some("test/ (by image_id), test_questions_vqa_format.json"),
            _ => None,
        }
    }
}

/// ImageNet-1k's class names as OpenFlamingo's evaluation prompts with
/// them (its `IMAGENET_CLASSNAMES`, OpenAI CLIP's curated list), in the
/// sorted order of the synset folders.
const IMAGENET_CLASS_NAMES: &str = include_str!("../data/imagenet_classnames.txt");

/// ImageNet-1k's folders: 1000 WordNet synset ids (`n01440764`, …).
fn is_imagenet_1k(classes: &[String]) -> bool {
    classes.len() == 1000
        && classes.iter().all(|class| {
            class.len() == 9
                && class.starts_with('n')
                && class[1..].chars().all(|c| c.is_ascii_digit())
        })
}

/// One example: an image and what goes with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// The id results are keyed by: COCO `cocoid`, Flickr file stem, VQA
    /// `question_id`, HatefulMemes `id`, ImageNet index.
    pub id: Value,
    pub image: PathBuf,
    /// The question (VQA) or the meme's text (HatefulMemes).
    pub text: Option<String>,
    /// What a demonstration shows: the first caption, the first answer or
    /// the class name.
    pub target: String,
    /// Captioning: all reference captions; VQA: all human answers.
    pub references: Vec<String>,
    /// Classification: the class index.
    pub class_id: Option<usize>,
}

/// A task's demonstration pool and test set.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub task: Task,
    pub train: Vec<Example>,
    pub test: Vec<Example>,
    /// Classification: the class names, by class index.
    pub class_names: Vec<String>,
    /// VQA: each human answer given both raw and as stored (`raw_answer`
    /// and `answer`, in annotations that have both, as OK-VQA v1.1 does).
    pub raw_answers: Vec<(String, String)>,
    /// A test-dev set (`load_testdev`): every question EvalAI wants an
    /// answer for, as (question_id, image_id); the test split has no
    /// answers.
    pub testdev: Option<Vec<(Value, Value)>>,
}

type Result<T> = std::result::Result<T, EvalError>;

/// A dataset file (or folder) that is missing or malformed.
fn bad(path: impl AsRef<Path>, message: impl Into<String>) -> EvalError {
    EvalError::Dataset {
        path: path.as_ref().to_path_buf(),
        message: message.into(),
    }
}

fn require(path: PathBuf, task: Task, what: &str) -> Result<PathBuf> {
    if path.exists() {
        Ok(path)
    } else {
        Err(bad(
            &path,
            format!("missing; {what} ({} reads: {})", task.name(), task.layout()),
        ))
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|error| bad(path, format!("{error}")))?;
    serde_json::from_str(&text).map_err(|error| bad(path, format!("not valid JSON ({error})")))
}

fn field<'v>(value: &'v Value, key: &str, path: &Path, index: usize) -> Result<&'v Value> {
    value
        .get(key)
        .ok_or_else(|| bad(path, format!("entry {index} has no \"{key}\"")))
}

fn string(value: &Value, key: &str, path: &Path, index: usize) -> Result<String> {
    match field(value, key, path, index)? {
        Value::String(text) => Ok(text.clone()),
        other => Err(bad(
            path,
            format!("entry {index}: \"{key}\" should be a string, found {other}"),
        )),
    }
}

/// Reads `task` from `dir`.
pub fn load(task: Task, dir: &Path) -> crate::Result<Dataset> {
    read(task, dir, false)
}

/// Reads `task`'s training split and its EvalAI test-dev questions, which
/// have no annotations (VQAv2 and VizWiz; `Task::testdev_layout`).
pub fn load_testdev(task: Task, dir: &Path) -> crate::Result<Dataset> {
    read(task, dir, true)
}

fn read(task: Task, dir: &Path, testdev: bool) -> Result<Dataset> {
    if testdev && task.testdev_layout().is_none() {
        return Err(EvalError::Settings {
            field: "testdev",
            message: format!(
                "{} has no EvalAI test-dev set here (vqav2 and vizwiz do)",
                task.name()
            ),
        });
    }
    if !dir.is_dir() {
        return Err(bad(
            dir,
            format!(
                "--data-dir is not a directory ({} reads: {})",
                task.name(),
                task.layout()
            ),
        ));
    }
    let mut raw_answers = Vec::new();
    let (train, test, class_names) = match task {
        Task::Coco | Task::Flickr30k => {
            let (train, test) = karpathy(task, dir)?;
            (train, test, Vec::new())
        }
        Task::Vqav2 | Task::OkVqa | Task::Textvqa | Task::Vizwiz => {
            let train = vqa(task, dir, Split::Train, &mut raw_answers)?;
            let split = if testdev { Split::TestDev } else { Split::Val };
            let test = vqa(task, dir, split, &mut raw_answers)?;
            (train, test, Vec::new())
        }
        Task::HatefulMemes => {
            let names = vec!["no".to_string(), "yes".to_string()];
            (
                hateful_memes(dir, "train.json")?,
                hateful_memes(dir, "dev.json")?,
                names,
            )
        }
        Task::Imagenet => image_folder(dir)?,
    };
    if train.is_empty() {
        return Err(bad(
            dir,
            format!(
                "the {} training split (the demonstrations) is empty",
                task.name()
            ),
        ));
    }
    if test.is_empty() {
        return Err(bad(dir, format!("the {} test split is empty", task.name())));
    }
    Ok(Dataset {
        task,
        train,
        test,
        class_names,
        raw_answers,
        testdev: if testdev {
            Some(testdev_questions(task, dir)?)
        } else {
            None
        },
    })
}

/// Karpathy's split file: `images[]` with `split`, `filepath`, `filename`,
/// `cocoid` and `sentences[].raw`. Train examples are the demonstrations,
/// test examples are scored.
fn karpathy(task: Task, dir: &Path) -> Result<(Vec<Example>, Vec<Example>)> {
    let (file, references_file) = match task {
        Task::Coco => ("dataset_coco.json", "captions_val2014.json"),
        _ => (
            "dataset_flickr30k.json",
            "dataset_flickr30k_coco_style.json",
        ),
    };
    let path = require(dir.join(file), task, "Karpathy's caption splits")?;
    let root = read_json(&path)?;
    let images = root
        .get("images")
        .and_then(Value::as_array)
        .ok_or_else(|| bad(&path, "no \"images\" list (is it Karpathy's split file?)"))?;
    let mut train = Vec::new();
    let mut test = Vec::new();
    for (index, entry) in images.iter().enumerate() {
        let split = string(entry, "split", &path, index)?;
        let into = match split.as_str() {
            "train" => &mut train,
            "test" => &mut test,
            _ => continue,
        };
        let filename = string(entry, "filename", &path, index)?;
        let (image, id) = if task == Task::Coco {
            let folder = if string(entry, "filepath", &path, index)? == "train2014" {
                "train2014"
            } else {
                "val2014"
            };
            (
                dir.join(folder).join(&filename),
                field(entry, "cocoid", &path, index)?.clone(),
            )
        } else {
            let stem = filename.split('.').next().unwrap_or(&filename).to_string();
            (
                dir.join("flickr30k-images").join(&filename),
                Value::String(stem),
            )
        };
        let sentences = field(entry, "sentences", &path, index)?
            .as_array()
            .ok_or_else(|| {
                bad(
                    &path,
                    format!("entry {index}: \"sentences\" should be a list"),
                )
            })?;
        let references = sentences
            .iter()
            .map(|sentence| string(sentence, "raw", &path, index))
            .collect::<Result<Vec<_>>>()?;
        let target = references.first().cloned().ok_or_else(|| {
            bad(
                &path,
                format!("entry {index} ({filename}) has no sentences"),
            )
        })?;
        into.push(Example {
            id,
            image,
            text: None,
            target,
            references,
            class_id: None,
        });
    }
    let references_path = dir.join(references_file);
    if references_path.exists() {
        let coco = read_json(&references_path)?;
        let annotations = coco
            .get("annotations")
            .and_then(Value::as_array)
            .ok_or_else(|| {
                bad(
                    &references_path,
                    "no \"annotations\" list (COCO caption format)",
                )
            })?;
        let mut by_image: HashMap<String, Vec<String>> = HashMap::new();
        for (index, annotation) in annotations.iter().enumerate() {
            let image = field(annotation, "image_id", &references_path, index)?;
            let key = match image {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            by_image.entry(key).or_default().push(string(
                annotation,
                "caption",
                &references_path,
                index,
            )?);
        }
        for example in &mut test {
            let key = match &example.id {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            example.references = by_image.remove(&key).ok_or_else(|| {
                bad(
                    &references_path,
                    format!("no captions for test image {key}"),
                )
            })?;
        }
    }
    Ok((train, test))
}

/// HatefulMemes' JSON lines: `id`, `img` (`img/xxxxx.png`), `label`, `text`.
fn hateful_memes(dir: &Path, file: &str) -> Result<Vec<Example>> {
    let role = if file == "train.json" {
        "the demonstrations"
    } else {
        "the memes to classify"
    };
    let path = require(dir.join(file), Task::HatefulMemes, role)?;
    let images = require(dir.join("img"), Task::HatefulMemes, "the meme images")?;
    let text = std::fs::read_to_string(&path).map_err(|error| bad(&path, format!("{error}")))?;
    let mut examples = Vec::new();
    for (index, line) in text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
    {
        let entry: Value = serde_json::from_str(line).map_err(|error| {
            bad(
                &path,
                format!("line {}: not valid JSON ({error})", index + 1),
            )
        })?;
        let label = field(&entry, "label", &path, index)?
            .as_u64()
            .filter(|label| *label <= 1)
            .ok_or_else(|| {
                bad(
                    &path,
                    format!("line {}: \"label\" should be 0 or 1", index + 1),
                )
            })? as usize;
        let img = string(&entry, "img", &path, index)?;
        let name = img.rsplit('/').next().unwrap_or(&img);
        let class = if label == 1 { "yes" } else { "no" };
        examples.push(Example {
            id: field(&entry, "id", &path, index)?.clone(),
            image: images.join(name),
            text: Some(string(&entry, "text", &path, index)?),
            target: class.to_string(),
            references: Vec::new(),
            class_id: Some(label),
        });
    }
    Ok(examples)
}

const IMAGE_EXTENSIONS: [&str; 7] = ["jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff"];

/// torchvision's ImageFolder: classes are the sorted sub-folders; samples
/// are each class's images in sorted order.
fn image_folder(dir: &Path) -> Result<(Vec<Example>, Vec<Example>, Vec<String>)> {
    let split = |name: &str| -> Result<(Vec<String>, Vec<Example>)> {
        let root = require(
            dir.join(name),
            Task::Imagenet,
            "one folder of images per class",
        )?;
        let mut classes: Vec<String> = std::fs::read_dir(&root)
            .map_err(|error| bad(&root, format!("{error}")))?
            .filter_map(|entry| entry.ok())
            .filter(|entry| entry.path().is_dir())
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect();
        classes.sort();
        let mut examples = Vec::new();
        for (class_id, class) in classes.iter().enumerate() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(root.join(class))
                .map_err(|error| bad(root.join(class), format!("{error}")))?
                .filter_map(|entry| entry.ok().map(|entry| entry.path()))
                .filter(|path| {
                    path.extension()
                        .and_then(|ext| ext.to_str())
                        .is_some_and(|ext| {
                            IMAGE_EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str())
                        })
                })
                .collect();
            files.sort();
            for image in files {
                examples.push(Example {
                    id: Value::from(examples.len()),
                    image,
                    text: None,
                    target: String::new(),
                    references: Vec::new(),
                    class_id: Some(class_id),
                });
            }
        }
        Ok((classes, examples))
    };
    let (train_classes, mut train) = split("train")?;
    let (val_classes, mut val) = split("val")?;
    // Classes are train/'s folders; val/ may lack some of them.
    for example in &mut val {
        let folder = &val_classes[example.class_id.unwrap_or_default()];
        let class_id = train_classes
            .iter()
            .position(|class| class == folder)
            .ok_or_else(|| {
                bad(dir, format!("val/{folder}/ has no counterpart in train/; every class needs demonstrations"))
            })?;
        example.class_id = Some(class_id);
    }
    let names_path = dir.join("classnames.txt");
    let names: Vec<String> = if names_path.exists() {
        let text = std::fs::read_to_string(&names_path)
            .map_err(|error| bad(&names_path, format!("{error}")))?;
        let names: Vec<String> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.trim().to_string())
            .collect();
        if names.len() != train_classes.len() {
            return Err(bad(&names_path, format!("{} names for {} class folders; give one name per folder, in sorted folder order", names.len(),
                train_classes.len())));
        }
        names
    } else if is_imagenet_1k(&train_classes) {
        IMAGENET_CLASS_NAMES.lines().map(str::to_string).collect()
    } else {
        train_classes
            .iter()
            .map(|class| class.replace('_', " "))
            .collect()
    };
    for example in train.iter_mut().chain(val.iter_mut()) {
        example.target = names[example.class_id.unwrap_or_default()].clone();
    }
    Ok((train, val, names))
}
