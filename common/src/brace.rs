//! Brace patterns as `braceexpand` (webdataset, OpenFlamingo) expands them:
//! numeric ranges keep the width of their bounds (`{00000..00009}`), lists
//! (`{a,b}`) expand in order, and several groups multiply left to right.

use crate::CommonError;

type Result<T> = std::result::Result<T, CommonError>;

/// The most shards one pattern may name unless configured otherwise: a
/// million shards is LAION-2B at 2,000 samples a shard, and the expansion
/// of a bigger pattern (`{0..99999999999}`) would exhaust memory.
pub const DEFAULT_MAX_SHARDS: u64 = 1_000_000;

/// Expands `pattern` into the URLs it names, in order, refusing a pattern
/// that names more than [`DEFAULT_MAX_SHARDS`].
pub fn expand(pattern: &str) -> Result<Vec<String>> {
    expand_at_most(pattern, DEFAULT_MAX_SHARDS)
}

/// Expands `pattern` after counting what it names (without expanding): more
/// than `limit` is an error that names the count and the limit.
pub fn expand_at_most(pattern: &str, limit: u64) -> Result<Vec<String>> {
    let count = count(pattern)?;
    if count > u128::from(limit) {
        return Err(CommonError::invalid(
            "shards",
            format!(
                "'{pattern}' names {count} shards, more than the limit of {limit}; \
                 split the dataset or raise the limit (--max-shards)"
            ),
        ));
    }
    expand_unchecked(pattern)
}

/// How many URLs `pattern` names, computed without expanding it
/// (saturating at `u128::MAX`).
pub fn count(pattern: &str) -> Result<u128> {
    let Some(open) = pattern.find('{') else {
        if pattern.contains('}') {
            return Err(CommonError::invalid(
                "shards",
                format!("'{pattern}' has a '}}' without '{{'"),
            ));
        }
        return Ok(1);
    };
    let close = matching_close(pattern, open).ok_or_else(|| {
        CommonError::invalid("shards", format!("'{pattern}' has a '{{' without '}}'"))
    })?;
    let body = &pattern[open + 1..close];
    let tail = count(&pattern[close + 1..])?;
    let alternatives = match range_bounds(body) {
        Some((start, end, _)) => u128::from(start.abs_diff(end)) + 1,
        None => {
            let mut total: u128 = 0;
            for part in split_top_level(body) {
                total = total.saturating_add(count(part)?);
            }
            total
        }
    };
    Ok(alternatives.saturating_mul(tail))
}

fn expand_unchecked(pattern: &str) -> Result<Vec<String>> {
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
    let tail = expand_unchecked(&pattern[close + 1..])?;
    let mut alternatives = Vec::new();
    if let Some(range) = numeric_range(body) {
        alternatives = range;
    } else {
        for part in split_top_level(body) {
            alternatives.extend(expand_unchecked(part)?);
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

/// The bounds of `a..b` and the width its values are padded to.
fn range_bounds(body: &str) -> Option<(u64, u64, usize)> {
    let (from, to) = body.split_once("..")?;
    let start: u64 = from.parse().ok()?;
    let end: u64 = to.parse().ok()?;
    let padded = (from.len() > 1 && from.starts_with('0')) || (to.len() > 1 && to.starts_with('0'));
    let width = if padded { from.len().max(to.len()) } else { 0 };
    Some((start, end, width))
}

/// `a..b` with decimal bounds; zero-padded to the width of the bounds when
/// either is written with a leading zero, as braceexpand does.
fn numeric_range(body: &str) -> Option<Vec<String>> {
    let (start, end, width) = range_bounds(body)?;
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
    use proptest::prelude::Strategy;

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
    fn a_huge_pattern_is_counted_and_refused_before_expanding() {
        let error = expand("s3://b/{0..99999999999}.tar")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("names 100000000000 shards, more than the limit of 1000000"),
            "{error}"
        );
        let error = expand_at_most("{0..9}/{0..9}/{a,b}", 199)
            .unwrap_err()
            .to_string();
        assert!(error.contains("names 200 shards"), "{error}");
        assert_eq!(
            expand_at_most("{0..9}/{0..9}/{a,b}", 200).unwrap().len(),
            200
        );
        // Many groups multiply past u64 without overflowing.
        let pattern = "{0..99999999999}".repeat(4);
        assert!(count(&pattern).unwrap() > u128::from(u64::MAX));
        assert!(expand(&pattern).is_err());
    }

    proptest::proptest! {
        /// The count is what expansion yields, for any pattern of small
        /// ranges, lists and nesting (and arbitrary text never panics).
        #[test]
        fn count_matches_expansion(
            parts in proptest::collection::vec(
                proptest::prop_oneof![
                    "[a-c/._-]{0,3}",
                    (0u64..30, 0u64..30).prop_map(|(a, b)| format!("{{{a}..{b}}}")),
                    (0u64..5, 0u64..120).prop_map(|(a, b)| format!("{{{a:02}..{b:03}}}")),
                    proptest::collection::vec("[a-z]{0,2}", 1..4).prop_map(|items| format!("{{{}}}", items.join(","))),
                    proptest::collection::vec("[a-z]{0,2}", 1..3).prop_map(|items| format!("{{x,{{{}}}}}", items.join(","))),
                ],
                0..4,
            ),
            noise in "[{}a,.0-9]{0,12}",
        ) {
            let pattern: String = parts.concat();
            let counted = count(&pattern).expect("counts");
            if counted > u128::from(DEFAULT_MAX_SHARDS) {
                // Three wide ranges can name over a million shards: refused
                // with the limit named, before expanding.
                let error = expand(&pattern).expect_err("over the limit").to_string();
                proptest::prop_assert!(error.contains("more than the limit"), "{}", error);
            } else {
                let expanded = expand(&pattern).expect("well-formed");
                proptest::prop_assert_eq!(counted, expanded.len() as u128);
            }
            if let Ok(urls) = expand(&noise) {
                proptest::prop_assert_eq!(count(&noise).expect("counts"), urls.len() as u128);
            }
        }
    }

    #[test]
    fn unbalanced_braces_are_named() {
        let error = expand("shard-{0..3.tar").unwrap_err().to_string();
        assert!(error.contains("without '}'"), "{error}");
    }
}
