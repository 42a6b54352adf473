//! OpenFlamingo's evaluation prompts (reference §4.2): one template per
//! task, demonstrations closed by `<|endofchunk|>`, captioning and VQA
//! demonstrations joined by a newline, classification ones not; the query
//! is the template with an empty answer. With 0 shots the two
//! demonstrations stay as text only (their `<image>` removed).

use crate::datasets::{Example, Kind, Task};

const END_OF_CHUNK: &str = "<|endofchunk|>";

fn template(task: Task, example: &Example, answer: Option<&str>) -> String {
    let closing = if answer.is_some() { END_OF_CHUNK } else { "" };
    let answer = answer.unwrap_or("");
    let text = example.text.as_deref().unwrap_or("");
    match task {
        Task::Coco | Task::Flickr30k | Task::Imagenet => format!("<image>Output:{answer}{closing}"),
        Task::Vqav2 | Task::OkVqa | Task::Textvqa | Task::Vizwiz => {
            format!("<image>Question:{text} Short answer:{answer}{closing}")
        }
        Task::HatefulMemes => format!(
            "<image>is an image with: '{text}' written on it. Is it hateful? Answer:{answer}{closing}"
        ),
    }
}

/// A demonstration: the example with its answer (captions are stripped of
/// surrounding whitespace, as upstream does).
pub fn demonstration(task: Task, example: &Example) -> String {
    let answer = if task.kind() == Kind::Captioning {
        example.target.trim()
    } else {
        example.target.as_str()
    };
    template(task, example, Some(answer))
}

/// The query: the template with the answer left for the model.
pub fn query(task: Task, example: &Example) -> String {
    template(task, example, None)
}

/// Demonstrations actually placed in the prompt for `shots`: the 0-shot
/// trick uses two, as text only.
pub fn effective_shots(shots: usize) -> usize {
    if shots == 0 {
        2
    } else {
        shots
    }
}

/// The whole prompt for `query_example` after `demos`.
pub fn prompt(task: Task, demos: &[&Example], query_example: &Example, shots: usize) -> String {
    let separator = if task.kind() == Kind::Classification {
        ""
    } else {
        "\n"
    };
    let mut context: String = demos
        .iter()
        .map(|demo| demonstration(task, demo) + separator)
        .collect();
    if shots == 0 {
        context = context.replace("<image>", "");
    }
    context + &query(task, query_example)
}

/// The images that go with [`prompt`], in order: the demonstrations' (none
/// with 0 shots), then the query's.
pub fn images<'e>(
    demos: &[&'e Example],
    query_example: &'e Example,
    shots: usize,
) -> Vec<&'e std::path::Path> {
    let mut images: Vec<&std::path::Path> = if shots == 0 {
        Vec::new()
    } else {
        demos.iter().map(|demo| demo.image.as_path()).collect()
    };
    images.push(query_example.image.as_path());
    images
}

/// A caption from a generation: the text before the first `Output`, with
/// double quotes removed.
pub fn postprocess_caption(text: &str) -> String {
    text.split("Output").next().unwrap_or(text).replace('"', "")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn example(text: Option<&str>, target: &str) -> Example {
        Example {
            id: Value::from(1),
            image: "a.png".into(),
            text: text.map(str::to_string),
            target: target.into(),
            references: vec![],
            class_id: None,
        }
    }

    #[test]
    fn prompts_follow_the_reference_templates() {
        let caption = example(None, " a red circle ");
        let query_caption = example(None, "ignored");
        assert_eq!(
            prompt(Task::Coco, &[&caption, &caption], &query_caption, 2),
            "<image>Output:a red circle<|endofchunk|>\n<image>Output:a red circle<|endofchunk|>\n<image>Output:"
        );
        assert_eq!(
            prompt(Task::Coco, &[&caption, &caption], &query_caption, 0),
            "Output:a red circle<|endofchunk|>\nOutput:a red circle<|endofchunk|>\n<image>Output:"
        );
        let question = example(Some("how many?"), "two");
        assert_eq!(
            prompt(Task::Vqav2, &[&question], &question, 1),
            "<image>Question:how many? Short answer:two<|endofchunk|>\n<image>Question:how many? Short answer:"
        );
        let meme = example(Some("hello"), "no");
        assert_eq!(
            prompt(Task::HatefulMemes, &[&meme], &meme, 1),
            "<image>is an image with: 'hello' written on it. Is it hateful? Answer:no<|endofchunk|><image>is an image with: 'hello' written on it. Is it hateful? Answer:"
        );
        assert_eq!(images(&[&meme], &question, 0).len(), 1);
        assert_eq!(images(&[&meme, &meme], &question, 2).len(), 3);
    }

    #[test]
    fn captions_stop_at_the_next_output_and_lose_quotes() {
        assert_eq!(
            postprocess_caption(" a \"big\" dog Output: x"),
            " a big dog "
        );
    }
}
