//! A tolerant tar reader for webdataset shards: ustar and GNU headers, GNU
//! long names (`L`) and pax `path` records (`x`). It works on byte ranges
//! (a whole shard streamed, or the range of a few samples read with one
//! request), so a sample never needs the shard around it. Garbage and
//! truncation end the parse with an error that says where; what was parsed
//! before it is kept.

use std::fmt;

pub const BLOCK: u64 = 512;

/// One regular file in the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    /// Offset of the first header that belongs to this member (a GNU
    /// long-name or pax header when there is one).
    pub header_offset: u64,
    pub data_offset: u64,
    pub size: u64,
}

impl Member {
    /// Offset just past the member's data, rounded up to a block.
    pub fn end(&self) -> u64 {
        self.data_offset + self.size.div_ceil(BLOCK) * BLOCK
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TarErrorKind {
    /// The data ends inside a header or a member's data.
    Truncated,
    /// A header whose checksum does not match: not a tar, or corrupt.
    BadChecksum,
    /// A size or name field that cannot be read.
    BadField(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarError {
    pub offset: u64,
    pub kind: TarErrorKind,
}

impl fmt::Display for TarError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            TarErrorKind::Truncated => write!(formatter, "truncated tar at byte {}", self.offset),
            TarErrorKind::BadChecksum => write!(
                formatter,
                "bad tar header checksum at byte {} (corrupt or not a tar)",
                self.offset
            ),
            TarErrorKind::BadField(field) => {
                write!(formatter, "unreadable tar {field} at byte {}", self.offset)
            }
        }
    }
}

impl std::error::Error for TarError {}

/// What a parse of a buffer found.
#[derive(Debug, Default)]
pub struct Parsed {
    pub members: Vec<Member>,
    /// Bytes of the buffer that hold complete entries (resume from here).
    pub consumed: u64,
    /// The archive's end-of-archive marker was reached.
    pub finished: bool,
    pub error: Option<TarError>,
}

fn octal(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|byte| byte & 0x80 != 0) {
        // GNU base-256 for large sizes.
        let mut value: u64 = u64::from(field[0] & 0x7f);
        for byte in &field[1..] {
            value = value.checked_mul(256)?.checked_add(u64::from(*byte))?;
        }
        return Some(value);
    }
    let text: String = field
        .iter()
        .take_while(|byte| **byte != 0)
        .map(|byte| *byte as char)
        .collect();
    let text = text.trim();
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

fn text(field: &[u8]) -> String {
    let end = field
        .iter()
        .position(|byte| *byte == 0)
        .unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

fn checksum_ok(header: &[u8]) -> bool {
    let Some(stored) = octal(&header[148..156]) else {
        return false;
    };
    let sum: u64 = header
        .iter()
        .enumerate()
        .map(|(index, byte)| {
            if (148..156).contains(&index) {
                u64::from(b' ')
            } else {
                u64::from(*byte)
            }
        })
        .sum();
    sum == stored
}

/// The `path` record of a pax extended header.
fn pax_path(data: &[u8]) -> Option<String> {
    let mut rest = data;
    while !rest.is_empty() {
        let space = rest.iter().position(|byte| *byte == b' ')?;
        let length: usize = std::str::from_utf8(&rest[..space]).ok()?.parse().ok()?;
        if length == 0 || length > rest.len() {
            return None;
        }
        let record = &rest[space + 1..length];
        let record = record.strip_suffix(b"\n").unwrap_or(record);
        if let Some(value) = record.strip_prefix(b"path=") {
            return Some(String::from_utf8_lossy(value).into_owned());
        }
        rest = &rest[length..];
    }
    None
}

/// Parses the entries in `data`, which starts at archive offset `base` on a
/// header boundary. With `at_end = false` an incomplete last entry is left
/// for the next call (see [`Parsed::consumed`]); with `at_end = true` it is
/// a truncation error.
pub fn parse(data: &[u8], base: u64, at_end: bool) -> Parsed {
    let mut parsed = Parsed::default();
    let mut position: usize = 0;
    let mut entry_start: usize = 0;
    let mut long_name: Option<String> = None;
    let block = BLOCK as usize;
    let truncated = |parsed: &mut Parsed, at: usize| {
        if at_end {
            parsed.error = Some(TarError {
                offset: base + at as u64,
                kind: TarErrorKind::Truncated,
            });
        }
    };
    loop {
        if position + block > data.len() {
            if position < data.len() || long_name.is_some() {
                truncated(&mut parsed, entry_start);
            }
            break;
        }
        let header = &data[position..position + block];
        if header.iter().all(|byte| *byte == 0) {
            parsed.finished = true;
            parsed.consumed = data.len() as u64;
            return parsed;
        }
        if !checksum_ok(header) {
            parsed.error = Some(TarError {
                offset: base + position as u64,
                kind: TarErrorKind::BadChecksum,
            });
            break;
        }
        let Some(size) = octal(&header[124..136]) else {
            parsed.error = Some(TarError {
                offset: base + position as u64,
                kind: TarErrorKind::BadField("size"),
            });
            break;
        };
        let data_start = position + block;
        // A size near u64::MAX (GNU base-256) must not wrap: it is a
        // corrupt header, reported at its offset like any other.
        let Some(padded) = size
            .div_ceil(BLOCK)
            .checked_mul(BLOCK)
            .and_then(|padded| usize::try_from(padded).ok())
            .and_then(|padded| data_start.checked_add(padded))
        else {
            parsed.error = Some(TarError {
                offset: base + position as u64,
                kind: TarErrorKind::BadField("size"),
            });
            break;
        };
        let typeflag = header[156];
        if padded > data.len() {
            truncated(&mut parsed, entry_start);
            break;
        }
        let data_end = data_start + size as usize;
        match typeflag {
            b'L' => {
                long_name = Some(text(&data[data_start..data_end]));
                position = padded;
                continue;
            }
            b'x' => {
                if let Some(path) = pax_path(&data[data_start..data_end]) {
                    long_name = Some(path);
                }
                position = padded;
                continue;
            }
            b'0' | 0 | b'7' => {
                let name = long_name.take().unwrap_or_else(|| {
                    let prefix = text(&header[345..500]);
                    let name = text(&header[0..100]);
                    let ustar = &header[257..262] == b"ustar";
                    if ustar && !prefix.is_empty() {
                        format!("{prefix}/{name}")
                    } else {
                        name
                    }
                });
                parsed.members.push(Member {
                    name,
                    header_offset: base + entry_start as u64,
                    data_offset: base + data_start as u64,
                    size,
                });
            }
            _ => {
                // Directories, links, global pax headers: nothing to keep.
                long_name = None;
            }
        }
        position = padded.min(data.len());
        entry_start = position;
        parsed.consumed = position as u64;
    }
    parsed
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn archive(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, data) in files {
            crate::pack::append_file(&mut out, name, data);
        }
        out.extend_from_slice(&[0u8; 1024]);
        out
    }

    /// A header whose base-256 size is `size`, with a valid checksum.
    fn header_with_size(size: u64) -> Vec<u8> {
        let mut out = archive(&[("a.txt", b"x")]);
        out.truncate(512);
        out[124] = 0x80;
        out[125..128].fill(0);
        out[128..136].copy_from_slice(&size.to_be_bytes());
        out[148..156].fill(b' ');
        let sum: u64 = out.iter().map(|byte| u64::from(*byte)).sum();
        out[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        out
    }

    #[test]
    fn a_base256_size_near_u64_max_is_a_bad_field_not_an_overflow() {
        let error = |kind| Some(TarError { offset: 0, kind });
        for size in [u64::MAX, u64::MAX - 511, u64::MAX - 1000] {
            let mut data = header_with_size(size);
            data.extend_from_slice(&[0x41; 2048]);
            for at_end in [false, true] {
                let parsed = parse(&data, 0, at_end);
                assert!(parsed.members.is_empty(), "size {size}");
                assert_eq!(
                    parsed.error,
                    error(TarErrorKind::BadField("size")),
                    "size {size}"
                );
            }
        }
        // Huge but representable: more than the data holds, a truncation.
        for size in [u64::MAX / 2, 1 << 62] {
            let mut data = header_with_size(size);
            data.extend_from_slice(&[0x41; 2048]);
            assert_eq!(parse(&data, 0, true).error, error(TarErrorKind::Truncated));
            let partial = parse(&data, 0, false);
            assert!(partial.error.is_none() && partial.members.is_empty() && partial.consumed == 0);
        }
        // The same header with a small base-256 size parses.
        let mut data = header_with_size(1);
        data.extend_from_slice(&[0x41; 512]);
        data.extend_from_slice(&[0; 1024]);
        let parsed = parse(&data, 0, true);
        assert_eq!(parsed.members.len(), 1);
        assert_eq!(parsed.members[0].size, 1);
        assert!(parsed.error.is_none());
    }

    proptest::proptest! {
        /// Fuzzing on stable: any bytes (and any mutation of a real
        /// archive) parse to members inside the buffer or an error; never a
        /// panic or an overflow.
        #[test]
        fn any_bytes_parse_without_panic(
            noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096),
            flips in proptest::collection::vec((0usize..3000, proptest::prelude::any::<u8>()), 0..16),
        ) {
            for (data, at_end) in [(noise.clone(), true), (noise, false)] {
                check_parse(&data, at_end);
            }
            let mut real = archive(&[("a.jpg", &[1u8; 700]), ("a.txt", b"caption"), ("b.json", b"{}")]);
            for (at, byte) in flips {
                let len = real.len();
                real[at % len] = byte;
            }
            check_parse(&real, true);
        }
    }

    fn check_parse(data: &[u8], at_end: bool) {
        let parsed = parse(data, 0, at_end);
        assert!(parsed.consumed <= data.len() as u64);
        for member in &parsed.members {
            assert!(member.data_offset + member.size <= data.len() as u64);
        }
    }

    #[test]
    fn members_offsets_and_long_names() {
        let long = format!("{}/k1.txt", "d".repeat(120));
        let data = archive(&[
            ("k0.jpg", b"abc"),
            (&long, b"hello"),
            ("k2.txt", &[7u8; 600]),
        ]);
        let parsed = parse(&data, 0, true);
        assert!(parsed.error.is_none(), "{:?}", parsed.error);
        assert!(parsed.finished);
        let names: Vec<&str> = parsed.members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["k0.jpg", long.as_str(), "k2.txt"]);
        let second = &parsed.members[1];
        // Its entry starts at the long-name header.
        assert_eq!(second.header_offset, 1024);
        assert_eq!(&data[second.data_offset as usize..][..5], b"hello");
        assert_eq!(parsed.members[2].size, 600);
        assert_eq!(
            parsed.members[2].end(),
            parsed.members[2].data_offset + 1024
        );
    }

    #[test]
    fn a_cut_archive_keeps_what_came_before_and_says_where() {
        let data = archive(&[("a.txt", b"one"), ("b.txt", &[1u8; 700])]);
        let cut = &data[..1024 + 512 + 100];
        let parsed = parse(cut, 0, true);
        assert_eq!(parsed.members.len(), 1);
        assert_eq!(
            parsed.error,
            Some(TarError {
                offset: 1024,
                kind: TarErrorKind::Truncated
            })
        );
        // Not at the end: the incomplete entry waits for more data.
        let partial = parse(cut, 0, false);
        assert!(partial.error.is_none());
        assert_eq!(partial.consumed, 1024);
    }

    #[test]
    fn garbage_is_a_checksum_error_not_a_panic() {
        let mut data = archive(&[("a.txt", b"one")]);
        data[10] ^= 0x55;
        let parsed = parse(&data, 4096, true);
        assert_eq!(
            parsed.error.unwrap().to_string(),
            "bad tar header checksum at byte 4096 (corrupt or not a tar)"
        );
        let random: Vec<u8> = (0..3000u32).map(|i| (i * 7919 % 251) as u8).collect();
        assert!(parse(&random, 0, true).error.is_some());
    }
}
