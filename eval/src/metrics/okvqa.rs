//! OK-VQA's answer stemming: what OpenFlamingo's `ok_vqa_utils` does to
//! every OK-VQA prediction before the VQA metric (reference §4.2; the
//! released open-flamingo 2.0.1). The prediction is cut as for the other VQA
//! sets (at the next prompt word, then at `, `), split into tokens by NLTK's
//! word tokenizer, and each token is replaced by:
//! - its entry in upstream's table of manual matches, if it has one;
//! - else, if it ends in "ing", its shortest verb lemma by WordNet's morphy
//!   (NLTK's `WordNetLemmatizer.lemmatize(word, "v")`);
//! - else, if it is a plural noun (`nltk.pos_tag` says NNS or NNPS), its
//!   singular as the `inflection` package makes it.
//!
//! Tokens are joined by single spaces.
//!
//! NLTK's tagger is an averaged perceptron whose weights are published only
//! in nltk_data on GitHub, out of this project's reach. Which tokens are
//! plural nouns is decided instead by, in order:
//! 1. the dataset itself, when its annotations hold each answer both raw
//!    and stemmed (`raw_answer` and `answer`, as OK-VQA v1.1 does). Those
//!    stems were made by this procedure, so for every answer word they
//!    record whether the tagger took it for a plural noun.
//! 2. WordNet's nouns (`is_plural_by_wordnet`) for the words the answers
//!    never use.
//!
//! Everything but that decision equals the Python code on fixtures
//! (`eval/tests/okvqa_parity.rs`, with NLTK 3.10 and inflection 0.5).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use fancy_regex::Regex;

/// A pattern and its replacement (`${n}` for group n).
struct Rule {
    pattern: Regex,
    replacement: &'static str,
}

fn rules(list: &[(&str, &'static str)]) -> Vec<Rule> {
    list.iter()
        .map(|(pattern, replacement)| Rule {
            pattern: Regex::new(pattern).expect("a valid pattern"),
            replacement,
        })
        .collect()
}

fn apply(rules: &[Rule], mut text: String) -> String {
    for rule in rules {
        // These patterns cannot hit fancy-regex's backtracking limit on
        // text this short; if one did, the text is left as it is.
        if let Ok(replaced) = rule.pattern.try_replacen(&text, 0, rule.replacement) {
            text = replaced.into_owned();
        }
    }
    text
}

// Python's `$` without MULTILINE also matches before a final newline.
const END: &str = r"(?=\n?\z)";

/// NLTK's `NLTKWordTokenizer` (the word tokenizer of `word_tokenize`), in
/// its order: starting quotes, punctuation, brackets, dashes, ending quotes
/// and clitics, contractions.
static BEFORE_PADDING: LazyLock<Vec<Rule>> = LazyLock::new(|| {
    let final_period_with_space = format!(r#"([^.])(\.)([\])}}>"'»”’ ]*+)\s*{END}"#);
    let trailing_colon = format!(r"([:,]){END}");
    let final_period = format!(r#"([^.])(\.)([\])}}>"']*)\s*{END}"#);
    let list: Vec<(&str, &'static str)> = vec![
        // Starting quotes.
        (r"([«“‘„]|[`]+)", " ${1} "),
        (r#"^""#, "``"),
        (r"(``)", " ${1} "),
        (r#"([ (\[{<])("|'{2})"#, "${1} `` "),
        (r"(?i)(?<!\w)(')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)", "${1} "),
        // Punctuation.
        (&final_period_with_space, "${1} ${2} ${3} "),
        (r"([:,])([^\d])", " ${1} ${2}"),
        (&trailing_colon, " ${1} "),
        (r"\.{2,}", " ${0} "),
        (r"[;@#$%&]", " ${0} "),
        ("[\u{2012}-\u{2015}]", " ${0} "),
        (&final_period, "${1} ${2}${3} "),
        (r"[?!]", " ${0} "),
        (r"([^'])' ", "${1} ' "),
        (r"[*]", " ${0} "),
        // Brackets, double dashes.
        (r"[\]\[(){}<>]", " ${0} "),
        (r"--", " -- "),
    ];
    rules(&list)
});

static AFTER_PADDING: LazyLock<Vec<Rule>> = LazyLock::new(|| {
    rules(&[
        // Ending quotes and clitics.
        (r"([»”’])", " ${1} "),
        (r"''", " '' "),
        (r#"""#, " '' "),
        (r"\s+", " "),
        (r"([^' ])('[sS]|'[mM]|'[dD]|') ", "${1} ${2} "),
        (r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ", "${1} ${2} "),
        // Robert MacIntyre's contractions.
        (r"(?i)\b(can)(not)\b", " ${1} ${2} "),
        (r"(?i)\b(d)('ye)\b", " ${1} ${2} "),
        (r"(?i)\b(gim)(me)\b", " ${1} ${2} "),
        (r"(?i)\b(gon)(na)\b", " ${1} ${2} "),
        (r"(?i)\b(got)(ta)\b", " ${1} ${2} "),
        (r"(?i)\b(lem)(me)\b", " ${1} ${2} "),
        (r"(?i)\b(more)('n)\b", " ${1} ${2} "),
        (r"(?i)\b(wan)(na)(?=\s)", " ${1} ${2} "),
        (r"(?i) ('t)(is)\b", " ${1} ${2} "),
        (r"(?i) ('t)(was)\b", " ${1} ${2} "),
    ])
});

/// NLTK's `word_tokenize` of one sentence (`preserve_line=True`; answers
/// are one sentence, and Punkt's sentence model is not available either).
pub fn word_tokenize(text: &str) -> Vec<String> {
    let text = apply(&BEFORE_PADDING, text.to_string());
    let text = apply(&AFTER_PADDING, format!(" {text} "));
    text.split_whitespace().map(str::to_string).collect()
}

/// Words `inflection.singularize` leaves alone.
static UNCOUNTABLE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)\b(equipment|fish|information|jeans|money|rice|series|sheep|species)\z")
        .expect("a valid pattern")
});

/// `inflection.SINGULARS` (irregular words first), the first that matches wins.
static SINGULARS: LazyLock<Vec<Rule>> = LazyLock::new(|| {
    rules(&[
        (r"(?i)(z)ombies$", "${1}ombie"),
        (r"k[iI][nN][eE]$", "cow"),
        (r"K[iI][nN][eE]$", "Cow"),
        (r"(?i)(m)oves$", "${1}ove"),
        (r"(?i)(s)exes$", "${1}ex"),
        (r"(?i)(c)hildren$", "${1}hild"),
        (r"(?i)(h)umans$", "${1}uman"),
        (r"(?i)(m)en$", "${1}an"),
        (r"(?i)(p)eople$", "${1}erson"),
        (r"(?i)(database)s$", "${1}"),
        (r"(?i)(quiz)zes$", "${1}"),
        (r"(?i)(matr)ices$", "${1}ix"),
        (r"(?i)(vert|ind)ices$", "${1}ex"),
        (r"(?i)(passer)sby$", "${1}by"),
        (r"(?i)^(ox)en", "${1}"),
        (r"(?i)(alias|status)(es)?$", "${1}"),
        (r"(?i)(octop|vir)(us|i)$", "${1}us"),
        (r"(?i)^(a)x[ie]s$", "${1}xis"),
        (r"(?i)(cris|test)(is|es)$", "${1}is"),
        (r"(?i)(shoe)s$", "${1}"),
        (r"(?i)(o)es$", "${1}"),
        (r"(?i)(bus)(es)?$", "${1}"),
        (r"(?i)(m|l)ice$", "${1}ouse"),
        (r"(?i)(x|ch|ss|sh)es$", "${1}"),
        (r"(?i)(m)ovies$", "${1}ovie"),
        (r"(?i)(s)eries$", "${1}eries"),
        (r"(?i)([^aeiouy]|qu)ies$", "${1}y"),
        (r"(?i)([lr])ves$", "${1}f"),
        (r"(?i)(tive)s$", "${1}"),
        (r"(?i)(hive)s$", "${1}"),
        (r"(?i)([^f])ves$", "${1}fe"),
        (r"(?i)(t)he(sis|ses)$", "${1}hesis"),
        (r"(?i)(s)ynop(sis|ses)$", "${1}ynopsis"),
        (r"(?i)(p)rogno(sis|ses)$", "${1}rognosis"),
        (r"(?i)(p)arenthe(sis|ses)$", "${1}arenthesis"),
        (r"(?i)(d)iagno(sis|ses)$", "${1}iagnosis"),
        (r"(?i)(b)a(sis|ses)$", "${1}asis"),
        (r"(?i)(a)naly(sis|ses)$", "${1}nalysis"),
        (r"(?i)([ti])a$", "${1}um"),
        (r"(?i)(n)ews$", "${1}ews"),
        (r"(?i)(ss)$", "${1}"),
        (r"(?i)s$", ""),
    ])
});

/// `inflection.singularize(word)`.
pub fn singularize(word: &str) -> String {
    if UNCOUNTABLE.is_match(word).unwrap_or(false) {
        return word.to_string();
    }
    for rule in SINGULARS.iter() {
        if rule.pattern.is_match(word).unwrap_or(false) {
            return apply(std::slice::from_ref(rule), word.to_string());
        }
    }
    word.to_string()
}

/// WordNet's morphy rules for verbs, in its order.
const VERB_RULES: [(&str, &str); 8] = [
    ("s", ""),
    ("ies", "y"),
    ("es", "e"),
    ("es", ""),
    ("ed", "e"),
    ("ed", ""),
    ("ing", "e"),
    ("ing", ""),
];

/// WordNet's morphy rules for nouns.
const NOUN_RULES: [(&str, &str); 8] = [
    ("s", ""),
    ("ses", "s"),
    ("xes", "x"),
    ("zes", "z"),
    ("ches", "ch"),
    ("shes", "sh"),
    ("men", "man"),
    ("ies", "y"),
];

/// Words ending in "s" that are never plural nouns.
const FUNCTION_WORDS: [&str; 22] = [
    "afterwards",
    "always",
    "as",
    "besides",
    "does",
    "goes",
    "has",
    "hers",
    "its",
    "nowadays",
    "ours",
    "perhaps",
    "theirs",
    "this",
    "thus",
    "towards",
    "was",
    "whereas",
    "yes",
    "yours",
    "is",
    "his",
];

/// One part of speech of WordNet: its lemmas and its exception list.
#[derive(Debug, Default)]
struct Lexicon {
    lemmas: HashSet<String>,
    exceptions: HashMap<String, Vec<String>>,
}

impl Lexicon {
    fn read(dir: &Path, part: &str) -> crate::Result<Self> {
        let read = |name: String| {
            let path = dir.join(&name);
            std::fs::read_to_string(&path).map_err(|source| crate::EvalError::Io { path, source })
        };
        let lemmas = read(format!("index.{part}"))?
            .lines()
            .filter(|line| !line.starts_with(' '))
            .filter_map(|line| line.split_whitespace().next())
            .map(str::to_string)
            .collect();
        let mut exceptions = HashMap::new();
        for line in read(format!("{part}.exc"))?.lines() {
            let mut terms = line.split_whitespace().map(str::to_string);
            if let Some(form) = terms.next() {
                exceptions.insert(form, terms.collect());
            }
        }
        Ok(Self { lemmas, exceptions })
    }

    /// morphy: `form` itself and its bases (from the exception list, else
    /// by the rules) that are lemmas, in order, without repeats.
    fn morphy(&self, form: &str, rules: &[(&str, &str)]) -> Vec<String> {
        let bases: Vec<String> = match self.exceptions.get(form) {
            Some(bases) => bases.clone(),
            None => rules
                .iter()
                .filter(|(old, _)| form.ends_with(old))
                .map(|(old, new)| format!("{}{new}", &form[..form.len() - old.len()]))
                .collect(),
        };
        let mut found: Vec<String> = Vec::new();
        for candidate in std::iter::once(form.to_string()).chain(bases) {
            if self.lemmas.contains(&candidate) && !found.contains(&candidate) {
                found.push(candidate);
            }
        }
        found
    }
}

/// Where WordNet is looked for when `--wordnet-dir` is not given.
pub fn wordnet_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os("WNSEARCHDIR") {
        dirs.push(PathBuf::from(dir));
    }
    dirs.push(PathBuf::from("/usr/share/wordnet"));
    if let Some(paths) = std::env::var_os("NLTK_DATA") {
        dirs.extend(std::env::split_paths(&paths).map(|dir| dir.join("corpora/wordnet")));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join("nltk_data/corpora/wordnet"));
    }
    dirs.push(PathBuf::from("/usr/share/nltk_data/corpora/wordnet"));
    dirs.push(PathBuf::from("/usr/local/share/nltk_data/corpora/wordnet"));
    dirs
}

/// OpenFlamingo's `OKVQAStemmer`, with plural nouns found as the module's
/// documentation says.
#[derive(Debug, Default)]
pub struct Stemmer {
    verbs: Lexicon,
    nouns: Lexicon,
    /// Per answer word: how often the dataset's stems singularized it, and
    /// how often they kept it although `singularize` would change it.
    votes: HashMap<String, (u32, u32)>,
}

impl Stemmer {
    /// Reads WordNet 3.0's verb and noun indexes and exception lists from
    /// `dir` (Debian's `wordnet-base` or NLTK's wordnet corpus folder), or
    /// from the first of `wordnet_dirs()` that has them.
    pub fn load(dir: Option<&Path>) -> crate::Result<Self> {
        let candidates = match dir {
            Some(dir) => vec![dir.to_path_buf()],
            None => wordnet_dirs(),
        };
        let files = ["index.verb", "verb.exc", "index.noun", "noun.exc"];
        let found = candidates
            .iter()
            .find(|dir| files.iter().all(|file| dir.join(file).is_file()));
        let Some(dir) = found else {
            let tried: Vec<String> = candidates.iter().map(|d| d.display().to_string()).collect();
            return Err(crate::EvalError::Settings {
                field: "wordnet-dir",
                message: format!(
                    "OK-VQA's answer stemming needs WordNet 3.0 ({}); not found in {}. Install Debian's wordnet-base (apt-get install wordnet-base) or pass --wordnet-dir DIR (NLTK's corpora/wordnet folder works too)",
                    files.join(", "),
                    tried.join(", ")
                ),
            });
        };
        Ok(Self {
            verbs: Lexicon::read(dir, "verb")?,
            nouns: Lexicon::read(dir, "noun")?,
            votes: HashMap::new(),
        })
    }

    /// Learns from one human answer, raw and as the dataset stemmed it,
    /// whether each of its words was taken for a plural noun.
    pub fn learn(&mut self, raw: &str, stemmed: &str) {
        let raw = word_tokenize(raw);
        let stemmed: Vec<&str> = stemmed.split_whitespace().collect();
        if raw.len() != stemmed.len() {
            return;
        }
        for (word, stem) in raw.iter().zip(stemmed) {
            if manual_match(word).is_some() || word.ends_with("ing") {
                continue;
            }
            let singular = singularize(word);
            if singular == *word {
                continue;
            }
            let votes = self.votes.entry(word.clone()).or_default();
            if stem == singular {
                votes.0 += 1;
            } else if stem == word {
                votes.1 += 1;
            }
        }
    }

    /// `WordNetLemmatizer().lemmatize(word, "v")`: the shortest verb lemma
    /// (the first of the shortest), else the word.
    pub fn lemmatize_verb(&self, word: &str) -> String {
        let lemmas = self.verbs.morphy(word, &VERB_RULES);
        let mut best: Option<&String> = None;
        for lemma in &lemmas {
            if best.is_none_or(|best| lemma.chars().count() < best.chars().count()) {
                best = Some(lemma);
            }
        }
        best.cloned().unwrap_or_else(|| word.to_string())
    }

    /// Whether `word` counts as a plural noun: the dataset's stems say so
    /// (a majority of them), else WordNet does.
    pub fn is_plural(&self, word: &str) -> bool {
        match self.votes.get(word) {
            Some((plural, kept)) if plural != kept => plural > kept,
            _ => self.is_plural_by_wordnet(word),
        }
    }

    /// A plural noun by WordNet: an irregular plural of its exception list
    /// (men, teeth), or a word ending in "s" (not "ss", "us" or "is", not a
    /// function word) that either is no noun lemma itself (dogs; unknown
    /// words, as the tagger's suffix features would have it) or is one that
    /// also has a singular noun lemma (glasses, pants), but not a singular
    /// noun that only ends in "s" (gas, news, lens).
    pub fn is_plural_by_wordnet(&self, word: &str) -> bool {
        let lower = word.to_lowercase();
        if let Some(bases) = self.nouns.exceptions.get(&lower) {
            return bases.iter().any(|base| *base != lower);
        }
        if !lower.ends_with('s')
            || ["ss", "us", "is"].iter().any(|end| lower.ends_with(end))
            || FUNCTION_WORDS.contains(&lower.as_str())
        {
            return false;
        }
        if !self.nouns.lemmas.contains(&lower) {
            return true;
        }
        self.nouns.morphy(&lower, &NOUN_RULES).len() > 1
    }

    /// The stemmed answer.
    pub fn stem(&self, text: &str) -> String {
        word_tokenize(text)
            .into_iter()
            .map(|word| {
                if let Some(matched) = manual_match(&word) {
                    matched.to_string()
                } else if word.ends_with("ing") {
                    self.lemmatize_verb(&word)
                } else if self.is_plural(&word) {
                    singularize(&word)
                } else {
                    word
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// OpenFlamingo's `postprocess_ok_vqa_generation`: the answer as for the
/// other VQA sets, stemmed.
pub fn postprocess(generation: &str, stemmer: &Stemmer) -> String {
    stemmer.stem(super::vqa::postprocess_generation(generation))
}

fn manual_match(word: &str) -> Option<&'static str> {
    MANUAL_MATCHES
        .binary_search_by(|(key, _)| key.cmp(&word))
        .ok()
        .map(|index| MANUAL_MATCHES[index].1)
}

/// Upstream's `_MANUAL_MATCHES` (words its automatic rules get wrong for
/// OK-VQA v1.1), sorted by word.
const MANUAL_MATCHES: [(&str, &str); 168] = [
    ("adhesives", "adhesive"),
    ("alertness", "alert"),
    ("alpes", "alp"),
    ("apartments", "apart"),
    ("are", "are"),
    ("awning", "awn"),
    ("backpackers", "backpack"),
    ("badness", "bad"),
    ("baldness", "bald"),
    ("bases", "base"),
    ("batter's", "batter"),
    ("belongings", "belong"),
    ("blindness", "blind"),
    ("boy's", "boy"),
    ("braves", "brave"),
    ("brightness", "bright"),
    ("browsing", "brows"),
    ("buildings", "build"),
    ("casings", "case"),
    ("caves", "cave"),
    ("charioteering", "chariot"),
    ("childrens", "children"),
    ("christmas", "christmas"),
    ("circuses", "circus"),
    ("clothes", "cloth"),
    ("clothing", "cloth"),
    ("coding", "code"),
    ("conducter", "conduct"),
    ("conferences", "confer"),
    ("coniferous", "conifer"),
    ("containers", "contain"),
    ("controllers", "control"),
    ("corgie", "corgi"),
    ("couponing", "coupon"),
    ("creame", "cream"),
    ("crepte", "crept"),
    ("cumulis", "cumuli"),
    ("curiousity", "curious"),
    ("dangerous", "danger"),
    ("daughter's", "daughter"),
    ("decorations", "decor"),
    ("designers", "design"),
    ("dining", "dine"),
    ("directions", "direct"),
    ("domino's", "domino"),
    ("doves", "dove"),
    ("drives", "drive"),
    ("drunkenness", "drunken"),
    ("earing", "ear"),
    ("earnings", "earn"),
    ("eatting", "eat"),
    ("electicity", "elect"),
    ("electronics", "electron"),
    ("elevators", "elev"),
    ("emirates", "emir"),
    ("expressions", "express"),
    ("farmer's", "farmer"),
    ("firefighters", "firefight"),
    ("firefighting", "firefight"),
    ("glaced", "glace"),
    ("gloves", "glove"),
    ("gondoliere", "gondolier"),
    ("graves", "grave"),
    ("haircutting", "haircut"),
    ("hamburgers", "hamburg"),
    ("hawke", "hawk"),
    ("hearding", "heard"),
    ("hell's", "hell"),
    ("hornes", "horn"),
    ("illness", "ill"),
    ("jeans", "jean"),
    ("kid's", "kid"),
    ("kindergartener", "kindergarten"),
    ("kiting", "kite"),
    ("las", "las"),
    ("leaves", "leaf"),
    ("lenses", "lens"),
    ("lowes", "low"),
    ("markings", "mark"),
    ("married", "married"),
    ("mating", "mate"),
    ("meetings", "meet"),
    ("men's", "men"),
    ("microwaves", "microwave"),
    ("minerals", "miner"),
    ("mopeds", "mope"),
    ("morning", "morn"),
    ("mountainous", "mountain"),
    ("mustange", "mustang"),
    ("nationals", "nation"),
    ("overseas", "oversea"),
    ("oxygenize", "oxygen"),
    ("paintings", "paint"),
    ("paned", "pane"),
    ("paring", "pare"),
    ("pease", "peas"),
    ("personals", "person"),
    ("pies", "pie"),
    ("piping", "pipe"),
    ("plating", "plate"),
    ("playfulness", "play"),
    ("polarizing", "polar"),
    ("police", "police"),
    ("pooping", "poop"),
    ("porche", "porch"),
    ("potatoe", "potato"),
    ("professionals", "profession"),
    ("projections", "project"),
    ("propellers", "propel"),
    ("protesters", "protest"),
    ("pudding", "pud"),
    ("purring", "pure"),
    ("quantas", "quanta"),
    ("rabbies", "rabbi"),
    ("raines", "rain"),
    ("reflections", "reflect"),
    ("regent's", "regent"),
    ("reminders", "remind"),
    ("reporters", "report"),
    ("revelations", "revel"),
    ("riding", "ride"),
    ("ringe", "ring"),
    ("ripeness", "ripe"),
    ("rodeoing", "rodeo"),
    ("routes", "rout"),
    ("sadness", "sad"),
    ("sautee", "saute"),
    ("scrapbooking", "scrapbook"),
    ("settings", "set"),
    ("shelves", "shelve"),
    ("sickness", "sick"),
    ("skateboarders", "skateboard"),
    ("smugness", "smug"),
    ("socializing", "social"),
    ("sometimes", "sometime"),
    ("staring", "stare"),
    ("stockings", "stock"),
    ("striping", "stripe"),
    ("sunbathing", "sunbath"),
    ("sunblocker", "sunblock"),
    ("suspenders", "suspend"),
    ("swining", "swine"),
    ("teasing", "teas"),
    ("teething", "teeth"),
    ("tenning", "ten"),
    ("tennis", "tennis"),
    ("texting", "text"),
    ("ties", "tie"),
    ("toileting", "toilet"),
    ("tomatoe", "tomato"),
    ("toppings", "top"),
    ("transitions", "transit"),
    ("travelers", "travel"),
    ("travellers", "travel"),
    ("urinating", "urine"),
    ("vacationing", "vacate"),
    ("vandalizers", "vandal"),
    ("vastness", "vast"),
    ("vegas", "vegas"),
    ("veteran's", "veteran"),
    ("wading", "wade"),
    ("walle", "wall"),
    ("waves", "wave"),
    ("weddings", "wed"),
    ("wetness", "wet"),
    ("wilderness", "wilder"),
    ("womens", "women"),
    ("yes", "yes"),
];
