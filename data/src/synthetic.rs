//! The synthetic shapes dataset, for demos and tests: procedurally drawn
//! images (shapes, colours, sizes, positions, counts) with captions that
//! say what is drawn ("two small red circles left of a blue square"), in
//! LAION form (image + caption) and MMC4 form (documents of several images
//! and sentences with a similarity matrix). It is learnable: a tiny model's
//! loss falls and its captions come to name the shapes.

use std::io::Cursor as IoCursor;

use base64::Engine as _;
use serde_json::json;

use flamingo_common::rng::Rng;

const SHAPES: [&str; 3] = ["circle", "square", "triangle"];
const COLOURS: [(&str, [u8; 3]); 5] = [
    ("red", [220, 30, 30]),
    ("green", [30, 170, 60]),
    ("blue", [40, 60, 220]),
    ("yellow", [235, 200, 20]),
    ("purple", [140, 40, 170]),
];
const COUNTS: [&str; 4] = ["", "a", "two", "three"];

/// One group of identical shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Group {
    pub count: usize,
    pub big: bool,
    pub colour: usize,
    pub shape: usize,
}

impl Group {
    fn words(&self) -> String {
        let size = if self.big { "big" } else { "small" };
        let plural = if self.count > 1 { "s" } else { "" };
        format!(
            "{} {size} {} {}{plural}",
            COUNTS[self.count], COLOURS[self.colour].0, SHAPES[self.shape]
        )
    }
}

/// A scene: one group, or two side by side (the first on the left).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scene {
    pub groups: Vec<Group>,
}

impl Scene {
    pub fn random(rng: &mut Rng) -> Self {
        let group = |rng: &mut Rng| Group {
            count: 1 + rng.below(3) as usize,
            big: rng.below(2) == 1,
            colour: rng.below(COLOURS.len() as u64) as usize,
            shape: rng.below(SHAPES.len() as u64) as usize,
        };
        let first = group(rng);
        let groups = if rng.below(2) == 1 {
            let mut second = group(rng);
            // Keep the two groups distinguishable.
            if second.colour == first.colour && second.shape == first.shape {
                second.colour = (second.colour + 1) % COLOURS.len();
            }
            vec![first, second]
        } else {
            vec![first]
        };
        Self { groups }
    }

    pub fn caption(&self) -> String {
        match self.groups.as_slice() {
            [one] => one.words(),
            [left, right] => format!("{} left of {}", left.words(), right.words()),
            _ => String::new(),
        }
    }

    /// RGB pixels, `size`², on a lightly noisy background (so the encoded
    /// files are of realistic size: MMC4 drops images under 11 kB).
    pub fn draw(&self, size: usize, rng: &mut Rng) -> Vec<u8> {
        let mut pixels = Vec::with_capacity(size * size * 3);
        for _ in 0..size * size {
            let shade = 235 + rng.below(20) as u8;
            pixels.extend_from_slice(&[shade, shade, shade]);
        }
        let halves = self.groups.len();
        for (half, group) in self.groups.iter().enumerate() {
            let (x0, x1) = (half * size / halves, (half + 1) * size / halves);
            let width = x1 - x0;
            let radius = if group.big { width / 5 } else { width / 9 }.max(2) as f64;
            for item in 0..group.count {
                let cx = x0 as f64 + width as f64 / 2.0;
                let cy = (item as f64 + 0.5) * size as f64 / group.count as f64;
                let colour = COLOURS[group.colour].1;
                for y in 0..size {
                    for x in 0..size {
                        let (dx, dy) = (x as f64 + 0.5 - cx, y as f64 + 0.5 - cy);
                        let inside = match group.shape {
                            0 => dx * dx + dy * dy <= radius * radius,
                            1 => dx.abs() <= radius && dy.abs() <= radius,
                            _ => dy <= radius && dy >= -radius && dx.abs() <= (dy + radius) / 2.0,
                        };
                        if inside {
                            pixels[(y * size + x) * 3..][..3].copy_from_slice(&colour);
                        }
                    }
                }
            }
        }
        pixels
    }
}

/// PNG bytes of RGB `pixels`.
pub fn encode_png(pixels: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let image = image::RgbImage::from_raw(size as u32, size as u32, pixels.to_vec())
        .expect("size² × 3 bytes");
    image
        .write_to(&mut IoCursor::new(&mut out), image::ImageFormat::Png)
        .expect("PNG encoding into memory cannot fail");
    out
}

/// One LAION-form sample: (key, [(suffix, bytes)]).
pub fn laion_sample(seed: u64, index: u64, size: usize) -> (String, Vec<(String, Vec<u8>)>) {
    let mut rng = Rng::keyed(&[seed, 0x5a, index]);
    let scene = Scene::random(&mut rng);
    let pixels = scene.draw(size, &mut rng);
    (
        format!("{index:09}"),
        vec![
            ("png".into(), encode_png(&pixels, size)),
            ("txt".into(), scene.caption().into_bytes()),
        ],
    )
}

/// One MMC4-form document: 2–4 images, each with its caption sentence and
/// a filler sentence; the similarity of an image to its own sentence is
/// high, to the others low, so the filters keep them and the assignment
/// pairs them correctly.
pub fn mmc4_sample(seed: u64, index: u64, size: usize) -> (String, Vec<(String, Vec<u8>)>) {
    let mut rng = Rng::keyed(&[seed, 0x3c, index]);
    let images = 2 + rng.below(3) as usize;
    let mut sentences = Vec::new();
    let mut image_info = Vec::new();
    let mut owners = Vec::new();
    for _ in 0..images {
        let scene = Scene::random(&mut rng);
        let pixels = scene.draw(size, &mut rng);
        owners.push(sentences.len());
        sentences.push(format!("Here {}.", scene.caption()));
        sentences.push("That is all in this picture.".to_string());
        image_info.push(json!({
            "image_name": format!("{index}-{}.png", owners.len()),
            "image_base64": base64::engine::general_purpose::STANDARD.encode(encode_png(&pixels, size)),
        }));
    }
    let similarity: Vec<Vec<f64>> = owners
        .iter()
        .map(|owner| {
            (0..sentences.len())
                .map(|sentence| if sentence == *owner { 0.32 } else { 0.12 })
                .collect()
        })
        .collect();
    let document = json!({
        "text_list": sentences,
        "image_info": image_info,
        "similarity_matrix": similarity,
        "url": format!("synthetic://{index}"),
    });
    (
        format!("{index:09}"),
        vec![("json".into(), document.to_string().into_bytes())],
    )
}

/// A synthetic sample, flawed with probability `fraction` (drawn per
/// sample from `seed` and `index`) in the ways crawled data is: MMC4
/// documents whose images all fall under the similarity threshold (half of
/// the flawed ones: rejected by design as `no_images`), an image that is not
/// base64 (`bad_base64`) or a truncated JSON (`bad_json`); LAION pairs
/// without a caption (`missing_text`) or with a truncated image
/// (`bad_image`).
pub fn flawed(
    sample: (String, Vec<(String, Vec<u8>)>),
    seed: u64,
    index: u64,
    fraction: f64,
) -> (String, Vec<(String, Vec<u8>)>) {
    let mut rng = Rng::keyed(&[seed, 0xf1, index]);
    if rng.next_f64() >= fraction {
        return sample;
    }
    let (key, mut members) = sample;
    let kind = rng.below(4);
    if let Some(json) = members.iter_mut().find(|(suffix, _)| suffix == "json") {
        let mut document: serde_json::Value =
            serde_json::from_slice(&json.1).expect("synthetic JSON");
        match kind {
            0 | 1 => {
                for row in document["similarity_matrix"]
                    .as_array_mut()
                    .into_iter()
                    .flatten()
                {
                    for value in row.as_array_mut().into_iter().flatten() {
                        *value = json!(0.05);
                    }
                }
                json.1 = document.to_string().into_bytes();
            }
            2 => {
                document["image_info"][0]["image_base64"] = json!("not base64!");
                json.1 = document.to_string().into_bytes();
            }
            _ => json.1.truncate(json.1.len() / 2),
        }
    } else if kind < 2 {
        members.retain(|(suffix, _)| suffix != "txt");
    } else if let Some(image) = members.iter_mut().find(|(suffix, _)| suffix == "png") {
        image.1.truncate(24);
    }
    (key, members)
}

/// Every word the synthetic captions and sentences use.
pub fn vocabulary() -> Vec<String> {
    let mut words: Vec<String> = [
        "a", "two", "three", "small", "big", "left", "of", "here", "that", "is", "all", "in",
        "this", "picture", "Here", "That", ".",
    ]
    .iter()
    .map(|word| word.to_string())
    .collect();
    for shape in SHAPES {
        words.push(shape.to_string());
        words.push(format!("{shape}s"));
    }
    words.extend(COLOURS.iter().map(|(name, _)| name.to_string()));
    words
}

/// A word-level Hugging Face tokenizer dir for the synthetic data
/// (`tokenizer.json` + `tokenizer_config.json`, EOS `<|endoftext|>`, no pad
/// token): small enough for a tiny model, exact for the captions.
pub fn write_tokenizer(dir: &std::path::Path) -> std::io::Result<()> {
    write_word_level_tokenizer(dir, vocabulary())
}

/// A word-level tokenizer dir: ids 0 and 1 are `<|endoftext|>` (EOS) and
/// `[UNK]`, then `words` in order (repeats keep their first id).
pub fn write_word_level_tokenizer(
    dir: &std::path::Path,
    words: impl IntoIterator<Item = String>,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut vocab = serde_json::Map::new();
    vocab.insert("<|endoftext|>".into(), json!(0));
    vocab.insert("[UNK]".into(), json!(1));
    for word in words {
        let id = vocab.len();
        vocab.entry(word).or_insert(json!(id));
    }
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<|endoftext|>"), special(1, "[UNK]")],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string())?;
    std::fs::write(
        dir.join("tokenizer_config.json"),
        json!({"eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"})
            .to_string(),
    )
}

/// A test fixture: `shards` LAION shards of `per_shard` synthetic samples
/// (keys `000000000`, `000000001`, …) under `dir`, the samples whose index
/// is a multiple of `corrupt_every` given an image that does not decode;
/// plus the tokenizer in `dir/lm`. Returns the dataset spec (TOML). Shared
/// by the data library's and the data service's tests.
pub async fn write_laion_fixture(
    dir: &std::path::Path,
    shards: usize,
    per_shard: usize,
    corrupt_every: u64,
) -> crate::Result<String> {
    let io = |error: std::io::Error| crate::DataError::Storage {
        url: dir.display().to_string(),
        message: error.to_string(),
    };
    write_tokenizer(&dir.join("lm")).map_err(io)?;
    let storage = crate::store::Storage::default();
    let pattern = format!("{}/laion-{{}}.tar", dir.display());
    let mut writer = crate::pack::ShardWriter::new(&storage, &pattern, per_shard);
    for index in 0..(shards * per_shard) as u64 {
        let (key, mut members) = laion_sample(9, index, 32);
        if corrupt_every > 0 && index % corrupt_every == corrupt_every - 1 {
            members[0].1 = b"\x89PNG but not really".to_vec();
        }
        writer.add(&key, &members).await?;
    }
    let (written, _) = writer.finish().await?;
    Ok(format!(
        "dataset = \"laion\"\nshards = \"{}\"\ntokenizer = \"{}\"\nimage_size = 16\nshuffle_block = 10\n",
        crate::pack::ShardWriter::brace_pattern(&pattern, written.len()),
        dir.join("lm").display()
    ))
}

/// A test fixture of MMC4 documents laid out to meet every verdict: a
/// random number of filler sentences before 1–3 images, so that with the
/// spec's short `max_tokens` some documents keep several images, some one
/// (and the seeded single-image drop applies), some end on their only
/// `<image>`; every `corrupt_every`-th document is not JSON. Shards
/// `mmc4-*.tar` under `dir`, the tokenizer in `dir/lm`; returns the spec.
pub async fn write_mmc4_fixture(
    dir: &std::path::Path,
    shards: usize,
    per_shard: usize,
    corrupt_every: u64,
) -> crate::Result<String> {
    let io = |error: std::io::Error| crate::DataError::Storage {
        url: dir.display().to_string(),
        message: error.to_string(),
    };
    write_tokenizer(&dir.join("lm")).map_err(io)?;
    let storage = crate::store::Storage::default();
    let pattern = format!("{}/mmc4-{{}}.tar", dir.display());
    let mut writer = crate::pack::ShardWriter::new(&storage, &pattern, per_shard);
    for index in 0..(shards * per_shard) as u64 {
        let key = format!("{index:09}");
        let document = if corrupt_every > 0 && index % corrupt_every == corrupt_every - 1 {
            b"{\"text_list\": [".to_vec()
        } else {
            fixture_document(index).into_bytes()
        };
        writer.add(&key, &[("json".into(), document)]).await?;
    }
    let (written, _) = writer.finish().await?;
    Ok(format!(
        "dataset = \"mmc4\"\nshards = \"{}\"\ntokenizer = \"{}\"\nimage_size = 16\nshuffle_block = 10\n\
         [mmc4]\nmin_image_kb = 0\nmax_tokens = 20\n",
        crate::pack::ShardWriter::brace_pattern(&pattern, written.len()),
        dir.join("lm").display()
    ))
}

fn fixture_document(index: u64) -> String {
    let mut rng = Rng::keyed(&[0x77, index]);
    // Every sixth document's first image falls exactly on the 20th token.
    let (fillers, padding) = if index % 6 == 2 {
        (2, 8)
    } else {
        (rng.below(3) as usize, rng.below(8) as usize)
    };
    let images = 1 + rng.below(3) as usize;
    let mut sentences: Vec<String> = (0..fillers)
        .map(|_| "That is all in this picture .".to_string())
        .collect();
    if fillers > 0 {
        sentences[0] = format!("That{} is all .", " all".repeat(padding));
    }
    let mut image_info = Vec::new();
    let mut owners = Vec::new();
    for _ in 0..images {
        let scene = Scene::random(&mut rng);
        let pixels = scene.draw(32, &mut rng);
        owners.push(sentences.len());
        sentences.push(format!("Here {} .", scene.caption()));
        image_info.push(json!({
            "image_name": format!("{index}-{}.png", owners.len()),
            "image_base64": base64::engine::general_purpose::STANDARD.encode(encode_png(&pixels, 32)),
        }));
    }
    let similarity: Vec<Vec<f64>> = owners
        .iter()
        .map(|owner| {
            (0..sentences.len())
                .map(|sentence| if sentence == *owner { 0.32 } else { 0.12 })
                .collect()
        })
        .collect();
    json!({
        "text_list": sentences,
        "image_info": image_info,
        "similarity_matrix": similarity,
        "url": format!("synthetic://{index}"),
    })
    .to_string()
}

/// The keys of [`write_laion_fixture`]'s samples that decode.
pub fn laion_fixture_good_keys(shards: usize, per_shard: usize, corrupt_every: u64) -> Vec<String> {
    (0..(shards * per_shard) as u64)
        .filter(|index| corrupt_every == 0 || index % corrupt_every != corrupt_every - 1)
        .map(|index| format!("{index:09}"))
        .collect()
}

/// One scene for the evaluation datasets (`flamingoctl data synth-eval`):
/// the scene and its PNG bytes, keyed by split and index.
pub fn eval_scene(seed: u64, split: u64, index: u64, size: usize) -> (Scene, Vec<u8>) {
    let mut rng = Rng::keyed(&[seed, 0xe7, split, index]);
    let scene = Scene::random(&mut rng);
    let pixels = scene.draw(size, &mut rng);
    (scene, encode_png(&pixels, size))
}

impl Scene {
    /// A question about the scene and its answer, VQA style: the colour of
    /// the (left) shape, or what shape it is, alternating with `index`.
    pub fn question(&self, index: u64) -> (String, String) {
        let first = self.groups[0];
        let place = if self.groups.len() > 1 {
            " on the left"
        } else {
            ""
        };
        if index.is_multiple_of(2) {
            (
                format!("What colour is the {}{place}?", SHAPES[first.shape]),
                COLOURS[first.colour].0.to_string(),
            )
        } else {
            (
                format!("What shape is the {} one{place}?", COLOURS[first.colour].0),
                SHAPES[first.shape].to_string(),
            )
        }
    }

    /// The shape of the (left) group: the class of the classification set.
    pub fn shape_name(&self) -> &'static str {
        SHAPES[self.groups[0].shape]
    }

    /// Whether anything in the scene is red (the "hateful" label of the
    /// synthetic HatefulMemes set: learnable from the image alone).
    pub fn has_red(&self) -> bool {
        self.groups.iter().any(|group| group.colour == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captions_say_what_is_drawn() {
        let scene = Scene {
            groups: vec![
                Group {
                    count: 2,
                    big: false,
                    colour: 0,
                    shape: 0,
                },
                Group {
                    count: 1,
                    big: true,
                    colour: 2,
                    shape: 1,
                },
            ],
        };
        assert_eq!(
            scene.caption(),
            "two small red circles left of a big blue square"
        );
        let pixels = scene.draw(64, &mut Rng::keyed(&[1]));
        // Red on the left half, blue on the right.
        let at = |x: usize, y: usize| &pixels[(y * 64 + x) * 3..][..3];
        assert_eq!(at(16, 16), [220, 30, 30]);
        assert_eq!(at(48, 32), [40, 60, 220]);
    }

    #[test]
    fn images_are_big_enough_for_mmc4_filters() {
        let (_, members) = mmc4_sample(3, 0, 96);
        let doc: serde_json::Value = serde_json::from_slice(&members[0].1).unwrap();
        let encoded = doc["image_info"][0]["image_base64"].as_str().unwrap();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        assert!(bytes.len() > 11_000, "{}", bytes.len());
    }
}
