//! Brace patterns as `braceexpand` (webdataset, OpenFlamingo) expands them:
//! numeric ranges keep the width of their bounds (`{00000..00009}`), lists
//! (`{a,b}`) expand in order, and several groups multiply left to right.

use crate::CommonError;

type Result<T> = std::result::Result<T, CommonError>;

/// Expands `pattern` into the URLs it names, in order.
pub fn expand(pattern: &str) -> Result<Vec<String>> {
    let Some(open) = pattern.find('{') else {
        if pattern.contains('}') {
            return Err(CommonError::invalid(
                "shards",
                format!("'{pattern}' has a '}}' without '{{'"),
            ));
        }
        return Ok(vec![pattern.to_string()]);
    };
    let close = matching_close(pattern, open).ok_or_else(|| {
        CommonError::invalid("shards", format!("'{pattern}' has a '{{' without '}}'"))
    })?;
    let head = &pattern[..open];
    let body = &pattern[open + 1..close];
    let tail = expand(&pattern[close + 1..])?;
    let mut alternatives = Vec::new();
    if let Some(range) = numeric_range(body) {
        alternatives = range;
    } else {
        for part in split_top_level(body) {
            alternatives.extend(expand(part)?);
        }
    }
    let mut out = Vec::with_capacity(alternatives.len() * tail.len());
    for alternative in &alternatives {
        for rest in &tail {
            out.push(format!("{head}{alternative}{rest}"));
        }
    }
    Ok(out)
}

fn matching_close(text: &str, open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (index, character) in text.char_indices().skip_while(|(index, _)| *index < open) {
        match character {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(index);
                }
            }
            _ => {}
        }
    }
    None
}

fn split_top_level(body: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (index, character) in body.char_indices() {
        match character {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&body[start..index]);
                start = index + 1;
            }
            _ => {}
        }
    }
    parts.push(&body[start..]);
    parts
}

/// `a..b` with decimal bounds; zero-padded to the width of the bounds when
/// either is written with a leading zero, as braceexpand does.
fn numeric_range(body: &str) -> Option<Vec<String>> {
    let (from, to) = body.split_once("..")?;
    let start: u64 = from.parse().ok()?;
    let end: u64 = to.parse().ok()?;
    let padded = (from.len() > 1 && from.starts_with('0')) || (to.len() > 1 && to.starts_with('0'));
    let width = if padded { from.len().max(to.len()) } else { 0 };
    let values: Vec<u64> = if start <= end {
        (start..=end).collect()
    } else {
        (end..=start).rev().collect()
    };
    Some(
        values
            .into_iter()
            .map(|value| format!("{value:0width$}"))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_keep_their_width_and_groups_multiply() {
        assert_eq!(
            expand("s3://b/shard-{00008..00011}.tar").unwrap(),
            [
                "s3://b/shard-00008.tar",
                "s3://b/shard-00009.tar",
                "s3://b/shard-00010.tar",
                "s3://b/shard-00011.tar"
            ]
        );
        assert_eq!(expand("x{1..3}").unwrap(), ["x1", "x2", "x3"]);
        assert_eq!(
            expand("{a,b}/{0..1}.tar").unwrap(),
            ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
        );
        assert_eq!(expand("{a,{b,c}}d").unwrap(), ["ad", "bd", "cd"]);
        assert_eq!(expand("plain.tar").unwrap(), ["plain.tar"]);
    }

    #[test]
    fn unbalanced_braces_are_named() {
        let error = expand("shard-{0..3.tar").unwrap_err().to_string();
        assert!(error.contains("without '}'"), "{error}");
    }
}
