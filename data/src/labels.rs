//! OpenFlamingo's label masking (reference §2.3), as `train_utils.py` does
//! it in the training loop; here it is done once, on the data service.

/// The ignore index of cross-entropy.
pub const IGNORE: i64 = -100;

/// LAION: supervise the caption, `<|endofchunk|>` and EOS; mask padding and
/// `<image>`. (Upstream also writes `labels[labels == tokenizer.eos_token]`,
/// which compares ids with a string and masks nothing.)
pub fn laion_labels(input_ids: &[i64], pad: i64, media: i64) -> Vec<i64> {
    input_ids
        .iter()
        .map(|id| {
            if *id == pad || *id == media {
                IGNORE
            } else {
                *id
            }
        })
        .collect()
}

/// MMC4: mask padding; every token before the first `<image>`; after each
/// `<|endofchunk|>`, every token up to the next `<image>` (the chunk end
/// itself stays supervised, the final EOS does not); and `<image>`.
pub fn interleaved_labels(input_ids: &[i64], pad: i64, media: i64, end_of_chunk: i64) -> Vec<i64> {
    let mut labels: Vec<i64> = input_ids
        .iter()
        .map(|id| if *id == pad { IGNORE } else { *id })
        .collect();
    let mut index = 0;
    while index < labels.len() && labels[index] != media {
        labels[index] = IGNORE;
        index += 1;
    }
    // Chunk ends are found before any masking of this pass, as upstream
    // computes `torch.where(labels == endofchunk)` once.
    let chunk_ends: Vec<usize> = labels
        .iter()
        .enumerate()
        .filter(|(_, id)| **id == end_of_chunk)
        .map(|(position, _)| position)
        .collect();
    for end in chunk_ends {
        let mut position = end + 1;
        while position < labels.len() && labels[position] != media {
            labels[position] = IGNORE;
            position += 1;
        }
    }
    for label in &mut labels {
        if *label == media {
            *label = IGNORE;
        }
    }
    labels
}

/// Python's `str.strip()`: Unicode whitespace plus the ASCII information
/// separators (U+001C..U+001F), which Python counts as whitespace and Rust
/// does not.
pub fn python_strip(text: &str) -> &str {
    text.trim_matches(|character: char| {
        character.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&character)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAD: i64 = 0;
    const MEDIA: i64 = 1;
    const EOC: i64 = 2;
    const EOS: i64 = 3;

    #[test]
    fn laion_masks_only_padding_and_images() {
        assert_eq!(
            laion_labels(&[MEDIA, 10, 11, EOC, EOS, PAD], PAD, MEDIA),
            [IGNORE, 10, 11, EOC, EOS, IGNORE]
        );
    }

    #[test]
    fn interleaved_masks_text_outside_image_chunks() {
        // text before the first image | image chunk | text after a chunk
        // end but before the next image | image chunk | eos, padding
        let ids = [
            20, 21, MEDIA, 30, 31, EOC, 40, MEDIA, 50, EOC, EOS, PAD, PAD,
        ];
        assert_eq!(
            interleaved_labels(&ids, PAD, MEDIA, EOC),
            [
                IGNORE, IGNORE, IGNORE, 30, 31, EOC, IGNORE, IGNORE, 50, EOC, IGNORE, IGNORE,
                IGNORE
            ]
        );
    }

    #[test]
    fn strip_matches_python() {
        assert_eq!(python_strip("\u{1f} a cat \n\u{a0}"), "a cat");
        assert_eq!(python_strip("x"), "x");
    }
}
