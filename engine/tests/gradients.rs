//! Gradient parity: one step's gradients of the trainable parameters — the
//! perceiver, the gated cross-attention layers and the (tied) input
//! embedding — on a tiny released-format model, for a right-padded batch of
//! two interleaved sequences labelled as OpenFlamingo labels them, must
//! match the Python OpenFlamingo's within 1e-4; the frozen ones get none.

mod common;

use flamingo_model::{causal_lm_loss, load_flamingo, ModelSpec, Weights};

#[test]
fn trainable_gradients_match_open_flamingo() {
    let dir = tempfile::tempdir().expect("temp dir");
    common::run_reference("grad_reference.py", dir.path());
    let mut reference =
        Weights::read_safetensors(&dir.path().join("gradients.safetensors")).expect("reference");
    let mut take = |key: &str| reference.remove(key).unwrap_or_else(|| panic!("{key}"));

    let spec = ModelSpec::from_file(&dir.path().join("model.toml")).expect("spec");
    let (model, _tokenizer) = load_flamingo(&spec).expect("model loads");
    let trainable = model.trainable_parameters(true);
    for (_, parameter) in &trainable {
        let _ = parameter.set_requires_grad(true);
    }
    let logits = model
        .forward_masked(
            &take("vision_x"),
            &take("lang_x"),
            Some(&take("attention_mask")),
        )
        .expect("forward");
    let loss = causal_lm_loss(&logits, &take("labels"));
    let expected_loss = take("loss").double_value(&[0]);
    let our_loss = loss.double_value(&[]);
    assert!(
        (our_loss - expected_loss).abs() <= 1e-5,
        "loss {our_loss} vs {expected_loss}"
    );
    loss.backward();

    let mut compared = 0;
    for (name, parameter) in &trainable {
        let expected = take(&format!("grad.{name}"));
        let gradient = parameter.grad();
        assert!(gradient.defined(), "{name}: no gradient");
        let difference = (&gradient - &expected).abs().max().double_value(&[]);
        let scale = expected.abs().max().double_value(&[]);
        assert!(
            difference <= 1e-4,
            "{name}: gradients differ by {difference} (largest {scale})"
        );
        compared += 1;
    }
    // 2 cross-attention layers × 11 tensors, the perceiver, the embedding.
    assert!(compared > 30, "only {compared} gradients compared");
    assert!(
        reference.keys().next().is_none(),
        "unused reference gradients: {:?}",
        reference.keys().collect::<Vec<_>>()
    );
    // Frozen weights (vision tower, decoder layers) get no gradient.
    for (name, parameter) in model.named_parameters() {
        if !trainable.iter().any(|(trained, _)| trained == name) {
            assert!(
                !parameter.grad().defined(),
                "{name} is frozen but got a gradient"
            );
        }
    }
}
