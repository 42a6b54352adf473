//! Parity with Hugging Face's tokenizer as OpenFlamingo sets it up: the same
//! ids for text with `<image>` and `<|endofchunk|>`, the same ids for the
//! added tokens, the same `len(tokenizer)`, the same decodings.

mod common;

use flamingo_preprocess::FlamingoTokenizer;

#[test]
fn tokenizer_matches_hugging_face_with_open_flamingo_tokens() {
    let dir = common::reference_dir("tokenizer_reference.py");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("reference.json")).unwrap())
            .unwrap();
    for name in ["byte_level", "metaspace"] {
        let expected = &reference[name];
        let tokenizer = FlamingoTokenizer::from_dir(&dir.path().join(name)).unwrap();
        assert_eq!(
            tokenizer.len() as u64,
            expected["len"].as_u64().unwrap(),
            "{name}: len"
        );
        assert_eq!(
            u64::from(tokenizer.media_token_id()),
            expected["media"].as_u64().unwrap(),
            "{name}: <image>"
        );
        assert_eq!(
            u64::from(tokenizer.end_of_chunk_token_id()),
            expected["eoc"].as_u64().unwrap(),
            "{name}: <|endofchunk|>"
        );
        assert_eq!(
            u64::from(tokenizer.pad_token_id()),
            expected["pad"].as_u64().unwrap(),
            "{name}: pad"
        );
        let texts = expected["texts"].as_array().unwrap();
        for (index, text) in texts.iter().enumerate() {
            let text = text.as_str().unwrap();
            let ids = tokenizer.encode(text, true).unwrap();
            let want: Vec<u32> = expected["ids"][index]
                .as_array()
                .unwrap()
                .iter()
                .map(|id| id.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(ids, want, "{name}: ids of {text:?}");
            assert_eq!(
                tokenizer.decode(&ids, true).unwrap(),
                expected["decoded"][index].as_str().unwrap(),
                "{name}: decoding of {text:?}"
            );
        }
    }
}

#[test]
fn a_missing_tokenizer_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let error = FlamingoTokenizer::from_dir(dir.path()).unwrap_err();
    let message = error.to_string();
    assert!(message.contains("tokenizer.json"), "{message}");
    assert!(
        message.contains("a Hugging Face tokenizer.json is expected"),
        "{message}"
    );
}
