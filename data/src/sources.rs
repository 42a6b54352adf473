//! What `flamingoctl data pack` packs: image–text pairs (a folder of images
//! with same-name `.txt` captions, or JSON lines with `image` and
//! `caption`), and MMC4 documents (JSON lines) whose images are embedded as
//! JPEG in base64, as OpenFlamingo's conversion scripts do.

use std::path::{Path, PathBuf};

use base64::Engine as _;

use crate::{DataError, Result};

/// One image–text pair: its sample key, image file and caption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub key: String,
    pub image: PathBuf,
    pub caption: String,
}

fn source_error(path: &Path, line: Option<usize>, message: impl Into<String>) -> DataError {
    let place = match line {
        Some(line) => format!("{} line {line}", path.display()),
        None => path.display().to_string(),
    };
    DataError::Source {
        place,
        message: message.into(),
    }
}

/// The pairs of `input`: a folder (sorted by name; images without a caption
/// are skipped with a note on stderr) or a JSON-lines file (image paths
/// relative to it).
pub fn read_pairs(input: &Path) -> Result<Vec<Pair>> {
    if input.is_dir() {
        return read_pair_folder(input);
    }
    let text = std::fs::read_to_string(input)
        .map_err(|error| source_error(input, None, error.to_string()))?;
    let base = input.parent().unwrap_or(Path::new("."));
    json_lines(input, &text)
        .map(|line| {
            let (number, value) = line?;
            let field = |names: &[&str]| names.iter().find_map(|name| value[*name].as_str());
            let image = field(&["image"])
                .ok_or_else(|| source_error(input, Some(number), "no \"image\" path"))?;
            let caption = field(&["caption", "text"])
                .ok_or_else(|| source_error(input, Some(number), "no \"caption\""))?;
            Ok(Pair {
                key: format!("{:09}", number - 1),
                image: base.join(image),
                caption: caption.to_string(),
            })
        })
        .collect()
}

fn read_pair_folder(input: &Path) -> Result<Vec<Pair>> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(input)
        .map_err(|error| source_error(input, None, error.to_string()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .collect();
    entries.sort();
    let mut pairs = Vec::new();
    for path in entries {
        if !matches!(extension(&path).as_deref(), Some("jpg" | "jpeg" | "png")) {
            continue;
        }
        let caption_path = path.with_extension("txt");
        let Ok(caption) = std::fs::read_to_string(&caption_path) else {
            eprintln!("skipping {}: no {}", path.display(), caption_path.display());
            continue;
        };
        let key = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .replace('.', "_");
        pairs.push(Pair {
            key,
            image: path,
            caption,
        });
    }
    Ok(pairs)
}

/// A file's lower-case extension.
pub fn extension(path: &Path) -> Option<String> {
    path.extension()
        .and_then(|e| e.to_str())
        .map(str::to_lowercase)
}

/// The non-empty lines of `text` as JSON, with their 1-based line numbers.
fn json_lines<'a>(
    path: &'a Path,
    text: &'a str,
) -> impl Iterator<Item = Result<(usize, serde_json::Value)>> + 'a {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(move |(index, line)| {
            serde_json::from_str(line)
                .map(|value| (index + 1, value))
                .map_err(|error| source_error(path, Some(index + 1), format!("not JSON ({error})")))
        })
}

/// The MMC4 documents of a JSON-lines file, with their 1-based line
/// numbers.
pub fn read_documents(input: &Path) -> Result<Vec<(usize, serde_json::Value)>> {
    let text = std::fs::read_to_string(input)
        .map_err(|error| source_error(input, None, error.to_string()))?;
    json_lines(input, &text).collect()
}

/// Embeds each of `document`'s images (`image_info[].image_name`, read from
/// `images`) as JPEG in `image_base64`; returns the names that were missing
/// or unreadable (left out).
pub fn embed_images(document: &mut serde_json::Value, images: &Path) -> Vec<String> {
    let mut missing = Vec::new();
    let Some(infos) = document["image_info"].as_array_mut() else {
        return missing;
    };
    for info in infos {
        let Some(name) = info["image_name"].as_str().map(String::from) else {
            continue;
        };
        // Re-encoded as JPEG, as convert_mmc4_to_wds.py does.
        let jpeg = std::fs::read(images.join(&name))
            .ok()
            .and_then(|bytes| image::load_from_memory(&bytes).ok())
            .and_then(|decoded| {
                let mut jpeg = Vec::new();
                decoded
                    .to_rgb8()
                    .write_to(
                        &mut std::io::Cursor::new(&mut jpeg),
                        image::ImageFormat::Jpeg,
                    )
                    .ok()
                    .map(|()| jpeg)
            });
        match jpeg {
            Some(jpeg) => {
                info["image_base64"] = base64::engine::general_purpose::STANDARD
                    .encode(jpeg)
                    .into();
            }
            None => missing.push(name),
        }
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_come_from_folders_and_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let png = crate::synthetic::encode_png(&[200; 3 * 4], 2);
        std::fs::write(dir.path().join("b.png"), &png).unwrap();
        std::fs::write(dir.path().join("b.txt"), "two").unwrap();
        std::fs::write(dir.path().join("a.jpg"), b"x").unwrap();
        std::fs::write(dir.path().join("a.txt"), "one").unwrap();
        std::fs::write(dir.path().join("c.png"), &png).unwrap();
        let pairs = read_pairs(dir.path()).unwrap();
        let keys: Vec<&str> = pairs.iter().map(|pair| pair.key.as_str()).collect();
        assert_eq!(keys, ["a", "b"], "c has no caption");
        let lines = dir.path().join("pairs.jsonl");
        std::fs::write(
            &lines,
            "{\"image\": \"b.png\", \"caption\": \"two\"}\n\n{\"image\": \"a.jpg\"}\n",
        )
        .unwrap();
        let error = read_pairs(&lines).unwrap_err().to_string();
        assert!(
            error.contains("pairs.jsonl line 3") && error.contains("caption"),
            "{error}"
        );
        let mut document = serde_json::json!({"image_info": [{"image_name": "b.png"}, {"image_name": "gone.png"}]});
        let missing = embed_images(&mut document, dir.path());
        assert_eq!(missing, ["gone.png"]);
        assert!(document["image_info"][0]["image_base64"].as_str().is_some());
    }
}
