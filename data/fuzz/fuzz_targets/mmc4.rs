//! Arbitrary bytes as an MMC4 document's JSON (and as a LAION caption):
//! preprocessing must reject bad samples with a reason, never panic.
#![no_main]

use std::sync::OnceLock;

use flamingo_data::prepare::{Decisions, Preparer};
use flamingo_data::sample::RawSample;
use flamingo_data::spec::DataSpec;
use flamingo_data::synthetic;
use libfuzzer_sys::fuzz_target;

fn preparers() -> &'static (Preparer, Preparer) {
    static PREPARERS: OnceLock<(Preparer, Preparer)> = OnceLock::new();
    PREPARERS.get_or_init(|| {
        let dir = std::env::temp_dir().join("flamingo-fuzz-tokenizer");
        synthetic::write_tokenizer(&dir).expect("tokenizer written");
        let spec = |dataset: &str| {
            DataSpec::from_toml(
                &format!("dataset = \"{dataset}\"\nshards = \"x\"\ntokenizer = \"{}\"\nimage_size = 8\n", dir.display()),
                None,
            )
            .expect("spec")
        };
        (
            Preparer::new(&spec("mmc4")).expect("mmc4 preparer"),
            Preparer::new(&spec("laion")).expect("laion preparer"),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let (mmc4, laion) = preparers();
    let bytes = bytes::Bytes::copy_from_slice(data);
    let document = RawSample {
        shard: "fuzz".into(),
        key: "k".into(),
        members: [("json".to_string(), bytes.clone())].into_iter().collect(),
    };
    let _ = mmc4.prepare(&document, Decisions::default());
    let pair = RawSample {
        shard: "fuzz".into(),
        key: "k".into(),
        members: [("txt".to_string(), bytes.clone()), ("png".to_string(), bytes)].into_iter().collect(),
    };
    let _ = laion.prepare(&pair, Decisions { flip: true, drop_if_single_image: true });
});
