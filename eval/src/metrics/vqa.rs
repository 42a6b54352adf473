//! VQA accuracy as OpenFlamingo's `eval/vqa_metric.py` (the official VQA
//! evaluation) computes it: both the prediction and the ten human answers
//! are normalised (punctuation, number words, articles, contractions); for
//! each human answer, the prediction scores min(1, matches among the other
//! nine / 3); a question's accuracy is the mean of those ten scores.
//!
//! Two quirks of the reference are kept, because the published numbers
//! carry them: its period-stripping pattern removes every `.` not followed
//! by a digit (the intended look-behind is written as a look-ahead), and at
//! most 32 of them (it passes `re.UNICODE` as the count). Digits are ASCII
//! digits here (Python's `\d` also matches other scripts' digits).

use std::collections::HashMap;

use super::round_like_python;

/// Removed, or replaced by a space, by the punctuation step.
const PUNCTUATION: [char; 21] = [
    ';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',',
    '?', '!',
];

const NUMBER_WORDS: [(&str, &str); 12] = [
    ("none", "0"),
    ("zero", "0"),
    ("one", "1"),
    ("two", "2"),
    ("three", "3"),
    ("four", "4"),
    ("five", "5"),
    ("six", "6"),
    ("seven", "7"),
    ("eight", "8"),
    ("nine", "9"),
    ("ten", "10"),
];

const ARTICLES: [&str; 3] = ["a", "an", "the"];

/// The official table of contractions written without their apostrophes.
const CONTRACTIONS: [(&str, &str); 120] = [
    ("'ow'sat", "'ow's'at"),
    ("'ows'at", "'ow's'at"),
    ("I'dve", "I'd've"),
    ("Id've", "I'd've"),
    ("Im", "I'm"),
    ("Ive", "I've"),
    ("aint", "ain't"),
    ("arent", "aren't"),
    ("cant", "can't"),
    ("couldn'tve", "couldn't've"),
    ("couldnt", "couldn't"),
    ("couldnt've", "couldn't've"),
    ("couldve", "could've"),
    ("didnt", "didn't"),
    ("doesnt", "doesn't"),
    ("dont", "don't"),
    ("hadn'tve", "hadn't've"),
    ("hadnt", "hadn't"),
    ("hadnt've", "hadn't've"),
    ("hasnt", "hasn't"),
    ("havent", "haven't"),
    ("he'dve", "he'd've"),
    ("hed", "he'd"),
    ("hed've", "he'd've"),
    ("hes", "he's"),
    ("howd", "how'd"),
    ("howll", "how'll"),
    ("hows", "how's"),
    ("isnt", "isn't"),
    ("it'dve", "it'd've"),
    ("itd", "it'd"),
    ("itd've", "it'd've"),
    ("itll", "it'll"),
    ("let's", "let's"),
    ("maam", "ma'am"),
    ("mightn'tve", "mightn't've"),
    ("mightnt", "mightn't"),
    ("mightnt've", "mightn't've"),
    ("mightve", "might've"),
    ("mustnt", "mustn't"),
    ("mustve", "must've"),
    ("neednt", "needn't"),
    ("notve", "not've"),
    ("oclock", "o'clock"),
    ("oughtnt", "oughtn't"),
    ("ow's'at", "'ow's'at"),
    ("shant", "shan't"),
    ("she'dve", "she'd've"),
    ("she's", "she's"),
    ("shed've", "she'd've"),
    ("shouldn'tve", "shouldn't've"),
    ("shouldnt", "shouldn't"),
    ("shouldnt've", "shouldn't've"),
    ("shouldve", "should've"),
    ("somebody'd", "somebodyd"),
    ("somebody'dve", "somebody'd've"),
    ("somebodyd've", "somebody'd've"),
    ("somebodyll", "somebody'll"),
    ("somebodys", "somebody's"),
    ("someone'dve", "someone'd've"),
    ("someoned", "someone'd"),
    ("someoned've", "someone'd've"),
    ("someonell", "someone'll"),
    ("someones", "someone's"),
    ("something'dve", "something'd've"),
    ("somethingd", "something'd"),
    ("somethingd've", "something'd've"),
    ("somethingll", "something'll"),
    ("thats", "that's"),
    ("there'dve", "there'd've"),
    ("thered", "there'd"),
    ("thered've", "there'd've"),
    ("therere", "there're"),
    ("theres", "there's"),
    ("they'dve", "they'd've"),
    ("theyd", "they'd"),
    ("theyd've", "they'd've"),
    ("theyll", "they'll"),
    ("theyre", "they're"),
    ("theyve", "they've"),
    ("twas", "'twas"),
    ("wasnt", "wasn't"),
    ("we'dve", "we'd've"),
    ("wed've", "we'd've"),
    ("werent", "weren't"),
    ("weve", "we've"),
    ("whatll", "what'll"),
    ("whatre", "what're"),
    ("whats", "what's"),
    ("whatve", "what've"),
    ("whens", "when's"),
    ("whered", "where'd"),
    ("wheres", "where's"),
    ("whereve", "where've"),
    ("who'dve", "who'd've"),
    ("whod", "who'd"),
    ("whod've", "who'd've"),
    ("wholl", "who'll"),
    ("whos", "who's"),
    ("whove", "who've"),
    ("whyll", "why'll"),
    ("whyre", "why're"),
    ("whys", "why's"),
    ("wont", "won't"),
    ("wouldn'tve", "wouldn't've"),
    ("wouldnt", "wouldn't"),
    ("wouldnt've", "wouldn't've"),
    ("wouldve", "would've"),
    ("y'all'dve", "y'all'd've"),
    ("y'alld've", "y'all'd've"),
    ("y'allll", "y'all'll"),
    ("yall", "y'all"),
    ("yall'd've", "y'all'd've"),
    ("yall'll", "y'all'll"),
    ("you'dve", "you'd've"),
    ("youd", "you'd"),
    ("youd've", "you'd've"),
    ("youll", "you'll"),
    ("youre", "you're"),
    ("youve", "you've"),
];

/// The reference's count argument to the period substitution (`re.UNICODE`).
const MAX_PERIODS_STRIPPED: usize = 32;

fn digit_comma_digit(text: &str) -> bool {
    let chars: Vec<char> = text.chars().collect();
    chars
        .windows(3)
        .any(|w| w[0].is_ascii_digit() && w[1] == ',' && w[2].is_ascii_digit())
}

/// The reference's `processPunctuation`.
fn punctuation(text: &str) -> String {
    let drop_all = digit_comma_digit(text);
    let mut out = text.to_string();
    for mark in PUNCTUATION {
        let spaced = text.contains(&format!("{mark} ")) || text.contains(&format!(" {mark}"));
        out = out.replace(mark, if spaced || drop_all { "" } else { " " });
    }
    let chars: Vec<char> = out.chars().collect();
    let mut stripped = String::with_capacity(out.len());
    let mut removed = 0;
    for (index, &c) in chars.iter().enumerate() {
        let before_digit = chars.get(index + 1).is_some_and(char::is_ascii_digit);
        if c == '.' && !before_digit && removed < MAX_PERIODS_STRIPPED {
            removed += 1;
            continue;
        }
        stripped.push(c);
    }
    stripped
}

/// The reference's `processDigitArticle`.
fn digits_and_articles(text: &str) -> String {
    let lower = text.to_lowercase();
    let words: Vec<&str> = lower
        .split_whitespace()
        .map(|word| {
            NUMBER_WORDS
                .iter()
                .find(|(name, _)| *name == word)
                .map_or(word, |(_, digit)| digit)
        })
        .filter(|word| !ARTICLES.contains(word))
        .map(|word| {
            CONTRACTIONS
                .iter()
                .find(|(bare, _)| *bare == word)
                .map_or(word, |(_, full)| full)
        })
        .collect();
    words.join(" ")
}

/// An answer as the metric compares it.
pub fn normalize(answer: &str) -> String {
    let answer = answer.replace(['\n', '\t'], " ");
    digits_and_articles(&punctuation(answer.trim()))
}

/// One question's accuracy in [0, 1] (not rounded).
pub fn accuracy(prediction: &str, answers: &[String]) -> f64 {
    if answers.is_empty() {
        return 0.0;
    }
    let predicted = normalize(prediction);
    let humans: Vec<String> = answers.iter().map(|answer| normalize(answer)).collect();
    let total: f64 = (0..humans.len())
        .map(|left_out| {
            let matches = humans
                .iter()
                .enumerate()
                .filter(|(index, human)| *index != left_out && **human == predicted)
                .count();
            (matches as f64 / 3.0).min(1.0)
        })
        .sum();
    total / humans.len() as f64
}

/// Per question and overall, in percent rounded to two decimals as the
/// reference reports them.
#[derive(Debug, Clone, PartialEq)]
pub struct VqaScores {
    pub overall: f64,
    /// In the order of the predictions.
    pub per_question: Vec<(u64, f64)>,
}

/// Scores `predictions` (question id, answer) against each question's human
/// answers. A prediction for a question without answers is an error that
/// names it.
pub fn evaluate(
    predictions: &[(u64, String)],
    answers: &HashMap<u64, Vec<String>>,
) -> crate::Result<VqaScores> {
    let error = |message: String| crate::EvalError::Metric {
        metric: "VQA accuracy",
        message,
    };
    if predictions.is_empty() {
        return Err(error("no predictions to score".into()));
    }
    let mut sum = 0.0;
    let mut per_question = Vec::with_capacity(predictions.len());
    for (question, prediction) in predictions {
        let humans = answers.get(question).ok_or_else(|| {
            error(format!(
                "question {question}: no human answers in the annotations"
            ))
        })?;
        let score = accuracy(prediction, humans);
        sum += score;
        per_question.push((*question, round_like_python(100.0 * score, 2)));
    }
    Ok(VqaScores {
        overall: round_like_python(100.0 * sum / predictions.len() as f64, 2),
        per_question,
    })
}

/// The answer in a VQA generation: the text before the first `Question`,
/// `Answer` or `Short`, then before the first `, ` (OpenFlamingo's
/// post-processing).
pub fn postprocess_generation(text: &str) -> &str {
    let end = ["Question", "Answer", "Short"]
        .iter()
        .filter_map(|marker| text.find(marker))
        .min()
        .unwrap_or(text.len());
    let answer = &text[..end];
    answer.split(", ").next().unwrap_or(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_normalised_as_the_official_evaluation_does() {
        assert_eq!(normalize("Two dogs."), "2 dogs");
        assert_eq!(normalize("the  Red  one"), "red 1");
        assert_eq!(normalize("dont know"), "don't know");
        assert_eq!(normalize("3.5"), "3.5");
        assert_eq!(normalize("1,000"), "1000");
        assert_eq!(normalize("black/white"), "black white");
        assert_eq!(normalize("yes !"), "yes");
    }

    #[test]
    fn three_matching_humans_give_full_credit() {
        let answers = |text: &[&str]| text.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let ten_yes = answers(&["yes"; 10]);
        assert_eq!(accuracy("Yes", &ten_yes), 1.0);
        let mut two = answers(&["no"; 10]);
        two[0] = "yes".into();
        two[1] = "yes".into();
        // Leaving out one of the two "yes": 1/3; leaving out a "no": 2/3.
        let expected = (2.0 * (1.0 / 3.0) + 8.0 * (2.0 / 3.0)) / 10.0;
        assert!((accuracy("yes", &two) - expected).abs() < 1e-12);
        assert_eq!(accuracy("maybe", &two), 0.0);
    }

    #[test]
    fn generations_are_cut_at_the_next_prompt_and_the_first_comma() {
        assert_eq!(postprocess_generation("red, blue Question: what"), "red");
        assert_eq!(postprocess_generation("two Short answer: three"), "two ");
        assert_eq!(postprocess_generation("plain"), "plain");
    }
}
