//! The fuzz targets of `data/fuzz` (run longer by hand with `cargo +nightly
//! fuzz`; runs recorded in `bench/RESULTS.md`), on stable as property tests so every CI run tries a few hundred
//! inputs: arbitrary bytes and mutated real samples as MMC4 documents and
//! LAION pairs, and arbitrary text as a data spec. Bad input must be
//! rejected with a reason, never panic.

use std::sync::OnceLock;

use flamingo_data::prepare::{Decisions, Preparer};
use flamingo_data::sample::RawSample;
use flamingo_data::spec::DataSpec;
use flamingo_data::synthetic;
use proptest::prelude::*;

fn tokenizer_dir() -> &'static std::path::Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        synthetic::write_tokenizer(dir.path()).expect("tokenizer written");
        dir
    })
    .path()
}

fn preparer(dataset: &str) -> &'static Preparer {
    static MMC4: OnceLock<Preparer> = OnceLock::new();
    static LAION: OnceLock<Preparer> = OnceLock::new();
    let cell = if dataset == "mmc4" { &MMC4 } else { &LAION };
    cell.get_or_init(|| {
        let spec = DataSpec::from_toml(
            &format!(
                "dataset = \"{dataset}\"\nshards = \"x\"\ntokenizer = \"{}\"\nimage_size = 8\n",
                tokenizer_dir().display()
            ),
            None,
        )
        .expect("spec");
        Preparer::new(&spec).expect("preparer")
    })
}

/// `PROPTEST_CASES` when set (a long run by hand), else `ci`.
fn cases(ci: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(ci)
}

fn raw(members: Vec<(String, Vec<u8>)>) -> RawSample {
    RawSample {
        shard: "fuzz".into(),
        key: "k".into(),
        members: members
            .into_iter()
            .map(|(name, bytes)| (name, bytes::Bytes::from(bytes)))
            .collect(),
    }
}

/// A real sample with `flips` (offset, byte) applied to member `member`.
fn mutated(
    (_key, mut members): (String, Vec<(String, Vec<u8>)>),
    member: usize,
    flips: &[(usize, u8)],
) -> RawSample {
    let index = member % members.len();
    let bytes = &mut members[index].1;
    for (at, byte) in flips {
        if !bytes.is_empty() {
            let len = bytes.len();
            bytes[at % len] = *byte;
        }
    }
    raw(members)
}

proptest! {
    // 200 inputs a target in CI; PROPTEST_CASES=100000 for a long run.
    #![proptest_config(ProptestConfig::with_cases(cases(200)))]

    #[test]
    fn arbitrary_bytes_as_mmc4_and_laion_are_rejected_not_fatal(
        data in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let _ = preparer("mmc4").prepare(&raw(vec![("json".into(), data.clone())]), Decisions::default());
        let _ = preparer("laion").prepare(
            &raw(vec![("txt".into(), data.clone()), ("png".into(), data)]),
            Decisions { flip: true, drop_if_single_image: true },
        );
    }

    #[test]
    fn mutated_real_samples_are_rejected_not_fatal(
        seed in 0u64..1000,
        member in 0usize..8,
        flips in proptest::collection::vec((0usize..4096, any::<u8>()), 1..12),
    ) {
        let mmc4 = mutated(synthetic::mmc4_sample(seed, 0, 8), member, &flips);
        let _ = preparer("mmc4").prepare(&mmc4, Decisions::default());
        let laion = mutated(synthetic::laion_sample(seed, 0, 8), member, &flips);
        let _ = preparer("laion").prepare(&laion, Decisions { flip: true, drop_if_single_image: false });
    }

    #[test]
    fn arbitrary_text_as_a_data_spec_is_an_error_not_a_panic(
        text in "[a-z_ =\"\\[\\]{}.0-9\n#-]{0,200}",
    ) {
        let _ = DataSpec::from_toml(&text, None);
        let _ = DataSpec::from_toml(&format!("dataset = \"laion\"\nshards = \"x\"\n{text}"), None);
    }
}
