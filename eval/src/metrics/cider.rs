//! CIDEr-D as pycocoevalcap's `Cider` scorer computes it (OpenFlamingo's
//! COCO and Flickr30K number): captions tokenised as its `PTBTokenizer`
//! does (Stanford PTBTokenizer, lower-cased, punctuation tokens dropped);
//! n-grams of 1 to 4 words weighted by tf-idf, with document frequencies
//! over each image's references and log(number of images) as the idf base;
//! each n-gram's candidate weight clipped at the reference's; cosine
//! similarity per n, times a Gaussian penalty on the length difference
//! (sigma 6); averaged over n and references, times 10.
//!
//! Kept as the reference has it: the "length" in the penalty counts
//! bigrams, not words, and a bracket survives as `-lrb-` (the punctuation
//! list is upper-case, the tokens lower-cased).

use std::collections::BTreeMap;

use crate::{EvalError, Result};

/// Tokens pycocoevalcap drops after tokenising.
const DROPPED: [&str; 17] = [
    "''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
    "...", ";",
];

/// Abbreviations whose period the PTB tokenizer keeps (a subset of its list).
const ABBREVIATIONS: [&str; 24] = [
    "mr", "mrs", "ms", "dr", "st", "jr", "sr", "ft", "vs", "etc", "inc", "co", "corp", "ltd", "mt",
    "no", "jan", "feb", "aug", "sept", "oct", "nov", "dec", "prof",
];

/// Contractions the PTB tokenizer splits in two.
const SPLIT_WORDS: [(&str, &str, &str); 6] = [
    ("cannot", "can", "not"),
    ("gonna", "gon", "na"),
    ("gotta", "got", "ta"),
    ("wanna", "wan", "na"),
    ("gimme", "gim", "me"),
    ("lemme", "lem", "me"),
];

fn is_abbreviation(word: &str) -> bool {
    let bare = word.trim_end_matches('.');
    // Letters with periods between them: u.s., a.m.
    let dotted = word.len() >= 2
        && word.ends_with('.')
        && bare.contains('.')
        && bare
            .split('.')
            .all(|part| part.len() == 1 && part.chars().all(char::is_alphabetic));
    dotted || (word.ends_with('.') && ABBREVIATIONS.contains(&bare.to_lowercase().as_str()))
}

/// One whitespace-separated chunk as PTB tokens (lower-cased).
fn split_chunk(chunk: &str, tokens: &mut Vec<String>) {
    let mut word = chunk.to_lowercase();
    // Leading punctuation.
    loop {
        let lead = if word.starts_with('"') {
            Some(("\"", "``"))
        } else if word.starts_with('(') {
            Some(("(", "-lrb-"))
        } else if word.starts_with('[') {
            Some(("[", "-lsb-"))
        } else if word.starts_with('{') {
            Some(("{", "-lcb-"))
        } else if word.starts_with('$') {
            Some(("$", "$"))
        } else if word.starts_with('#') {
            Some(("#", "#"))
        } else if word.starts_with('`') {
            Some(("`", "`"))
        } else {
            None
        };
        match lead {
            Some((text, token)) if word.len() > text.len() => {
                tokens.push(token.to_string());
                word = word[text.len()..].to_string();
            }
            _ => break,
        }
    }
    // Trailing punctuation, outermost last.
    let mut trailing = Vec::new();
    loop {
        if word.len() > 3 && word.ends_with("...") {
            trailing.push("...".to_string());
            word.truncate(word.len() - 3);
            continue;
        }
        let Some(last) = word.chars().last() else {
            break;
        };
        if word.chars().count() == 1 {
            break;
        }
        let token = match last {
            ',' | ';' | ':' | '!' | '?' => last.to_string(),
            '"' => "''".to_string(),
            ')' => "-rrb-".to_string(),
            ']' => "-rsb-".to_string(),
            '}' => "-rcb-".to_string(),
            '\'' if !word.ends_with("s'") => "'".to_string(),
            '.' if !is_abbreviation(&word) => ".".to_string(),
            _ => break,
        };
        trailing.push(token);
        word.truncate(word.len() - last.len_utf8());
    }
    // Clitics: n't, 's, 're, 've, 'll, 'd, 'm.
    let mut rest = None;
    if let Some(stem) = word.strip_suffix("n't").filter(|stem| !stem.is_empty()) {
        rest = Some((stem.to_string(), "n't".to_string()));
    } else {
        for clitic in ["'s", "'re", "'ve", "'ll", "'d", "'m"] {
            if let Some(stem) = word.strip_suffix(clitic).filter(|stem| !stem.is_empty()) {
                rest = Some((stem.to_string(), clitic.to_string()));
                break;
            }
        }
    }
    match rest {
        Some((stem, clitic)) => {
            tokens.push(stem);
            tokens.push(clitic);
        }
        None => match SPLIT_WORDS.iter().find(|(whole, _, _)| *whole == word) {
            Some((_, first, second)) => {
                tokens.push(first.to_string());
                tokens.push(second.to_string());
            }
            None if !word.is_empty() => tokens.push(word),
            None => {}
        },
    }
    tokens.extend(trailing.into_iter().rev());
}

/// A caption as pycocoevalcap's `PTBTokenizer` leaves it: PTB tokens,
/// lower-cased, without punctuation tokens, joined by single spaces.
pub fn tokenize(caption: &str) -> String {
    let mut tokens = Vec::new();
    for chunk in caption.split_whitespace() {
        split_chunk(chunk, &mut tokens);
    }
    tokens
        .into_iter()
        .filter(|token| !DROPPED.contains(&token.as_str()))
        .collect::<Vec<_>>()
        .join(" ")
}

type Ngram = Vec<String>;

fn counts(sentence: &str) -> BTreeMap<Ngram, f64> {
    let words: Vec<String> = sentence.split_whitespace().map(String::from).collect();
    let mut out = BTreeMap::new();
    for n in 1..=4 {
        for window in words.windows(n) {
            *out.entry(window.to_vec()).or_insert(0.0) += 1.0;
        }
    }
    out
}

struct Vector {
    weights: [BTreeMap<Ngram, f64>; 4],
    norms: [f64; 4],
    /// The reference's "length": its bigram count.
    length: f64,
}

fn vector(
    counts: &BTreeMap<Ngram, f64>,
    frequency: &BTreeMap<Ngram, f64>,
    log_images: f64,
) -> Vector {
    let mut weights: [BTreeMap<Ngram, f64>; 4] = Default::default();
    let mut squares = [0.0; 4];
    let mut length = 0.0;
    for (ngram, &count) in counts {
        let df = frequency.get(ngram).copied().unwrap_or(0.0).max(1.0).ln();
        let n = ngram.len() - 1;
        let weight = count * (log_images - df);
        weights[n].insert(ngram.clone(), weight);
        squares[n] += weight * weight;
        if n == 1 {
            length += count;
        }
    }
    Vector {
        weights,
        norms: squares.map(f64::sqrt),
        length,
    }
}

fn similarity(candidate: &Vector, reference: &Vector) -> [f64; 4] {
    let delta = candidate.length - reference.length;
    let penalty = (-(delta * delta) / (2.0 * 6.0 * 6.0)).exp();
    std::array::from_fn(|n| {
        let mut value: f64 = candidate.weights[n]
            .iter()
            .map(|(ngram, &weight)| {
                let theirs = reference.weights[n].get(ngram).copied().unwrap_or(0.0);
                weight.min(theirs) * theirs
            })
            .sum();
        if candidate.norms[n] != 0.0 && reference.norms[n] != 0.0 {
            value /= candidate.norms[n] * reference.norms[n];
        }
        value * penalty
    })
}

fn error(message: impl Into<String>) -> EvalError {
    EvalError::Metric {
        metric: "CIDEr",
        message: message.into(),
    }
}

/// Per image and overall CIDEr-D of tokenised `candidates[i]` against
/// tokenised `references[i]` (use [`tokenize`] first).
pub fn cider(candidates: &[String], references: &[Vec<String>]) -> Result<(f64, Vec<f64>)> {
    if candidates.len() != references.len() || candidates.is_empty() {
        return Err(error(format!(
            "{} candidates for {} images",
            candidates.len(),
            references.len()
        )));
    }
    let reference_counts: Vec<Vec<BTreeMap<Ngram, f64>>> = references
        .iter()
        .map(|refs| refs.iter().map(|r| counts(r)).collect())
        .collect();
    let mut frequency: BTreeMap<Ngram, f64> = BTreeMap::new();
    for refs in &reference_counts {
        let mut seen: Vec<&Ngram> = refs.iter().flat_map(|r| r.keys()).collect();
        seen.sort();
        seen.dedup();
        for ngram in seen {
            *frequency.entry(ngram.clone()).or_insert(0.0) += 1.0;
        }
    }
    let log_images = (references.len() as f64).ln();
    let mut scores = Vec::with_capacity(candidates.len());
    for (candidate, refs) in candidates.iter().zip(&reference_counts) {
        if refs.is_empty() {
            return Err(error("an image without reference captions"));
        }
        let ours = vector(&counts(candidate), &frequency, log_images);
        let mut total = [0.0; 4];
        for reference in refs {
            let theirs = vector(reference, &frequency, log_images);
            for (sum, value) in total.iter_mut().zip(similarity(&ours, &theirs)) {
                *sum += value;
            }
        }
        let mean = total.iter().sum::<f64>() / 4.0;
        scores.push(mean / refs.len() as f64 * 10.0);
    }
    let overall = scores.iter().sum::<f64>() / scores.len() as f64;
    Ok((overall, scores))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captions_are_tokenised_as_the_ptb_tokenizer_does() {
        assert_eq!(
            tokenize("A man riding a wave on top of a surfboard."),
            "a man riding a wave on top of a surfboard"
        );
        assert_eq!(
            tokenize("The dog's ball isn't red, it's \"blue\" (mostly)."),
            "the dog 's ball is n't red it 's blue -lrb- mostly -rrb-"
        );
        assert_eq!(
            tokenize("He can't go -- Mr. Smith's T-shirt!"),
            "he ca n't go mr. smith 's t-shirt"
        );
        assert_eq!(
            tokenize("at the U.S. embassy, 10:30 a.m."),
            "at the u.s. embassy 10:30 a.m."
        );
    }

    #[test]
    fn a_candidate_equal_to_its_references_beats_an_unrelated_one() {
        let references = vec![
            vec![
                "two red circles".to_string(),
                "two red circles left".to_string(),
            ],
            vec!["a blue square".to_string(), "one blue square".to_string()],
        ];
        let (_, good) = cider(
            &["two red circles".into(), "a blue square".into()],
            &references,
        )
        .unwrap();
        let (_, bad) = cider(
            &["a blue square".into(), "two red circles".into()],
            &references,
        )
        .unwrap();
        assert!(good[0] > bad[0] && good[1] > bad[1], "{good:?} {bad:?}");
    }
}
