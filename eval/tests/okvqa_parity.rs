//! OK-VQA's stemming against OpenFlamingo's own `ok_vqa_utils` (NLTK's
//! tokenizer and WordNet lemmatizer, the `inflection` package) on fixtures
//! made here: the tokens, the stemmed answers, and over thousands of WordNet
//! words the verb lemmas and the singulars. The tagger is the one part not
//! compared: the reference is given our plural decisions (see
//! `tests/reference/okvqa_reference.py`). WordNet is Debian's (`wordnet-base`,
//! installed by scripts/setup.sh).

use std::path::Path;

use flamingo_eval::metrics::okvqa::{singularize, word_tokenize, Stemmer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const WORDNET: &str = "/usr/share/wordnet";

/// Answers as a model might generate them: punctuation, quotes, clitics,
/// contractions, upstream's manual matches, "-ing" words and plurals.
const TEXTS: [&str; 48] = [
    "dogs",
    " two dogs\n",
    "Dogs.",
    "the glasses",
    "clothes",
    "riding",
    "leaves",
    "running shoes",
    "skiing",
    "lying down",
    "being careful",
    "ceiling",
    "men's room",
    "hell's kitchen",
    "children",
    "people",
    "mice, rats",
    "buses: red",
    "quizzes!",
    "matrices?",
    "octopi",
    "wolves (grey)",
    "knives & forks",
    "analyses...",
    "news",
    "gas",
    "texas",
    "series",
    "sheep",
    "databases",
    "\"surfboards\"",
    "'cause it's raining",
    "i cannot say",
    "gonna rain",
    "wanna play",
    "'tis the season",
    "don't know",
    "they're eating",
    "it is a baby's toy",
    "--teeth--",
    "$5 or 10%",
    "mr. smith.",
    "“sunglasses”",
    "a b c",
    "New York.  Boston",
    "tennis rackets",
    "Running",
    "hot dogs ",
];

fn words(path: &str) -> Vec<String> {
    std::fs::read_to_string(Path::new(WORDNET).join(path))
        .expect("Debian's WordNet (apt-get install wordnet-base)")
        .lines()
        .filter(|line| !line.starts_with(' '))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|word| word.chars().all(|c| c.is_ascii_lowercase()))
        .map(str::to_string)
        .collect()
}

#[test]
fn stemming_equals_openflamingo_ok_vqa_utils() {
    let stemmer = Stemmer::load(Some(Path::new(WORDNET))).unwrap();
    let mut rng = StdRng::seed_from_u64(11);
    let nouns = words("index.noun");
    let verbs = words("index.verb");

    // Verbs as "-ing" forms (regular, with a dropped "e", with a doubled
    // consonant), the exception list's "-ing" forms, and words that only
    // look like them.
    let mut ing: Vec<String> = Vec::new();
    for verb in verbs.iter().step_by(7) {
        ing.push(format!("{verb}ing"));
        if let Some(stem) = verb.strip_suffix('e') {
            ing.push(format!("{stem}ing"));
        }
        if let Some(last) = verb.chars().last() {
            ing.push(format!("{verb}{last}ing"));
        }
    }
    ing.extend(
        std::fs::read_to_string(Path::new(WORDNET).join("verb.exc"))
            .unwrap()
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .filter(|form| form.ends_with("ing"))
            .map(str::to_string),
    );
    ing.extend(["thing", "king", "Running", "ing", "spring"].map(String::from));

    // Nouns and their would-be plurals, in three cases.
    let mut plurals: Vec<String> = Vec::new();
    for noun in nouns.iter().step_by(23) {
        plurals.push(noun.clone());
        plurals.push(format!("{noun}s"));
        plurals.push(format!("{noun}es"));
        if let Some(stem) = noun.strip_suffix('y') {
            plurals.push(format!("{stem}ies"));
        }
        if let Some(stem) = noun.strip_suffix('f') {
            plurals.push(format!("{stem}ves"));
        }
    }
    let capitalised: Vec<String> = plurals
        .iter()
        .step_by(5)
        .flat_map(|word| {
            let mut chars = word.chars();
            let first: String = chars
                .next()
                .map(|c| c.to_uppercase().collect())
                .unwrap_or_default();
            [format!("{first}{}", chars.as_str()), word.to_uppercase()]
        })
        .collect();
    plurals.extend(capitalised);
    plurals.extend(
        [
            "kine",
            "Kine",
            "people",
            "men",
            "women",
            "axes",
            "passersby",
            "oxen",
            "theses",
            "data",
        ]
        .map(String::from),
    );

    // Generated answers: a few words from the pools, with punctuation.
    let mut texts: Vec<String> = TEXTS.iter().map(|t| t.to_string()).collect();
    let marks = ["", "", ".", ",", "!", "'s", "?", " and"];
    for _ in 0..300 {
        let count = rng.random_range(1..4);
        let text: Vec<String> = (0..count)
            .map(|_| {
                let pool = if rng.random_bool(0.5) { &plurals } else { &ing };
                let word = &pool[rng.random_range(0..pool.len())];
                format!("{word}{}", marks[rng.random_range(0..marks.len())])
            })
            .collect();
        texts.push(text.join(" "));
    }

    let mut plural = serde_json::Map::new();
    for text in &texts {
        for token in word_tokenize(text) {
            let decision = stemmer.is_plural(&token);
            plural.insert(token, decision.into());
        }
    }
    let folder = tempfile::tempdir().unwrap();
    let dir = folder.path();
    std::fs::write(
        dir.join("fixtures.json"),
        serde_json::to_vec(&json!({
            "wordnet_dir": WORDNET,
            "texts": texts,
            "plural": plural,
            "verbs": ing,
            "nouns": plurals,
        }))
        .unwrap(),
    )
    .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/okvqa_reference.py");
    flamingo_common::testing::run_python(&script, &[dir.as_os_str()]);
    let reference: Value =
        serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();

    let strings = |key: &str| -> Vec<Value> { reference[key].as_array().unwrap().clone() };
    for (text, want) in texts.iter().zip(strings("tokens")) {
        assert_eq!(json!(word_tokenize(text)), want, "tokens of {text:?}");
    }
    for (text, want) in texts.iter().zip(strings("stems")) {
        let ours = flamingo_eval::metrics::okvqa::postprocess(text, &stemmer);
        assert_eq!(json!(ours), want, "stem of {text:?}");
    }
    for (word, want) in ing.iter().zip(strings("lemmas")) {
        assert_eq!(
            json!(stemmer.lemmatize_verb(word)),
            want,
            "verb lemma of {word:?}"
        );
    }
    for (word, want) in plurals.iter().zip(strings("singulars")) {
        assert_eq!(json!(singularize(word)), want, "singular of {word:?}");
    }
    eprintln!(
        "equal: {} answers' tokens and stems, {} verb lemmas, {} singulars",
        texts.len(),
        ing.len(),
        plurals.len()
    );
    assert!(ing.len() > 1000 && plurals.len() > 5000);
}

/// The dataset's raw and stemmed answers decide which words are plural
/// nouns; WordNet decides the rest.
#[test]
fn answers_stemmed_in_the_dataset_teach_the_plural_decision() {
    let mut stemmer = Stemmer::load(Some(Path::new(WORDNET))).unwrap();
    // WordNet alone: "glasses" has the lemma "glass", "gas" does not
    // shrink to a noun but "dogs" does; "is" and "lens" are no plurals.
    assert!(stemmer.is_plural("glasses"));
    assert!(stemmer.is_plural("dogs"));
    assert!(stemmer.is_plural("teeth"));
    assert!(!stemmer.is_plural("gas"));
    assert!(!stemmer.is_plural("news"));
    assert!(!stemmer.is_plural("is"));
    assert!(!stemmer.is_plural("bus"));
    assert_eq!(stemmer.stem("the glasses"), "the glass");
    // The dataset kept "glasses" twice and singularized it once: kept.
    stemmer.learn("reading glasses", "read glasses");
    stemmer.learn("glasses", "glasses");
    stemmer.learn("glasses", "glass");
    // It singularized "physics" (a noun lemma WordNet alone keeps).
    stemmer.learn("physics", "physic");
    // Token counts that differ teach nothing.
    stemmer.learn("gas station", "gas");
    assert_eq!(stemmer.stem("the glasses"), "the glasses");
    assert_eq!(stemmer.stem("physics"), "physic");
    assert_eq!(stemmer.stem("gas"), "gas");
}

#[test]
fn missing_wordnet_is_named_with_what_to_install() {
    let folder = tempfile::tempdir().unwrap();
    let error = Stemmer::load(Some(folder.path())).unwrap_err().to_string();
    assert!(error.contains("index.verb"), "{error}");
    assert!(error.contains("wordnet-base"), "{error}");
    assert!(
        error.contains(&folder.path().display().to_string()),
        "{error}"
    );
}
