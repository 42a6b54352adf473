//! Parity with the Python OpenFlamingo: the Perceiver resampler and the gated
//! cross-attention block, on tiny random weights (non-zero gates), must give
//! OpenFlamingo's own outputs to 1e-5 in fp32. The reference comes from
//! `tests/reference/helpers_reference.py` run against the installed
//! open-flamingo package.

mod common;

use flamingo_model::{
    GatedCrossAttentionBlock, MaskedCrossAttention, MediaMask, PerceiverConfig, PerceiverResampler,
    Weights,
};
use tch::{Kind, Tensor};

const TOLERANCE: f64 = 1e-5;

fn reference() -> (tempfile::TempDir, Weights) {
    common::reference_weights("helpers_reference.py", "reference.safetensors")
}

fn assert_close(actual: &Tensor, expected: &Tensor, what: &str) {
    common::assert_close(actual, expected, TOLERANCE, what);
}

fn small_perceiver(depth: i64) -> PerceiverConfig {
    PerceiverConfig {
        dim: 32,
        depth,
        dim_head: 8,
        heads: 4,
        num_latents: 5,
        ff_mult: 4,
        max_num_media: None,
        max_num_frames: None,
    }
}

#[test]
fn perceiver_and_gated_cross_attention_match_open_flamingo() {
    let (_dir, mut weights) = reference();
    let vision = weights.take("input.vision", &[2, 3, 1, 7, 32]).unwrap();
    let vision_frames = weights
        .take("input.vision_frames", &[2, 3, 2, 7, 32])
        .unwrap();
    let text = weights.take("input.text", &[2, 9, 24]).unwrap();
    let locations = weights
        .take("input.locations", &[2, 9])
        .unwrap()
        .to_kind(Kind::Bool);
    let new_text = weights.take("input.new_text", &[2, 4, 24]).unwrap();

    let perceiver =
        PerceiverResampler::load(&mut weights, "perceiver", small_perceiver(2)).unwrap();
    weights.expect_consumed("perceiver.").unwrap();
    let media = perceiver.forward(&vision).unwrap();
    assert_close(
        &media,
        &weights.take("output.perceiver", &[2, 3, 5, 32]).unwrap(),
        "perceiver",
    );

    let timed_config = PerceiverConfig {
        max_num_media: Some(3),
        max_num_frames: Some(2),
        ..small_perceiver(1)
    };
    let timed = PerceiverResampler::load(&mut weights, "perceiver_timed", timed_config).unwrap();
    weights.expect_consumed("perceiver_timed.").unwrap();
    assert_close(
        &timed.forward(&vision_frames).unwrap(),
        &weights
            .take("output.perceiver_timed", &[2, 3, 5, 32])
            .unwrap(),
        "perceiver with frame and media-time embeddings",
    );

    let block = GatedCrossAttentionBlock::load(&mut weights, "xattn", 24, 32, 8, 4, 4).unwrap();
    weights.expect_consumed("xattn.").unwrap();
    // Upstream's other mask (`only_attend_immediate_media=False`): a token
    // sees every image at or before it, and one before any image gets a
    // uniform row over the masked scores instead of a zero output.
    let all_previous = MaskedCrossAttention::load(&mut weights, "all_previous", 24, 32, 8, 4)
        .unwrap()
        .attend_all_previous_media();
    weights.expect_consumed("all_previous.").unwrap();
    type Forward<'a> = Box<dyn Fn(&Tensor, MediaMask<'_>) -> Tensor + 'a>;
    let modules: [(&str, &str, Forward); 2] = [
        (
            "xattn",
            "gated cross-attention, only-immediate-media mask",
            Box::new(|text, mask| block.forward(text, &media, mask).unwrap()),
        ),
        (
            "all_previous",
            "cross-attention to all previous media",
            Box::new(|text, mask| all_previous.forward(text, &media, mask).unwrap()),
        ),
    ];
    for (key, what, forward) in &modules {
        assert_close(
            &forward(&text, MediaMask::Locations(&locations)),
            &weights.take(&format!("output.{key}"), &[2, 9, 24]).unwrap(),
            what,
        );
        assert_close(
            &forward(&new_text, MediaMask::Cached(&locations)),
            &weights
                .take(&format!("output.{key}_cached"), &[2, 4, 24])
                .unwrap(),
            &format!("{what}, cached media"),
        );
    }
    weights.expect_consumed("").unwrap();
}

#[test]
fn tokens_before_the_first_image_only_get_the_feed_forward() {
    // A token before any <image> gets no attention output, so the block must
    // give it exactly what the same block with a zero attention gate gives.
    let (_dir, mut weights) = reference();
    let text = weights.take("input.text", &[2, 9, 24]).unwrap();
    let locations = weights
        .take("input.locations", &[2, 9])
        .unwrap()
        .to_kind(Kind::Bool);
    let vision = weights.take("input.vision", &[2, 3, 1, 7, 32]).unwrap();
    let perceiver =
        PerceiverResampler::load(&mut weights, "perceiver", small_perceiver(2)).unwrap();
    let media = perceiver.forward(&vision).unwrap();
    let block = GatedCrossAttentionBlock::load(&mut weights, "xattn", 24, 32, 8, 4, 4).unwrap();

    let (_zeroed_dir, mut zeroed) = reference();
    zeroed.insert("xattn.attn_gate", Tensor::zeros([1], tch::kind::FLOAT_CPU));
    let feed_forward_only =
        GatedCrossAttentionBlock::load(&mut zeroed, "xattn", 24, 32, 8, 4, 4).unwrap();

    let masked = block
        .forward(&text, &media, MediaMask::Locations(&locations))
        .unwrap();
    let without_attention = feed_forward_only
        .forward(&text, &media, MediaMask::Locations(&locations))
        .unwrap();
    // Row 0's token 0 and row 1's tokens 0-1 come before any image.
    assert_close(
        &masked.get(0).narrow(0, 0, 1),
        &without_attention.get(0).narrow(0, 0, 1),
        "row 0",
    );
    assert_close(
        &masked.get(1).narrow(0, 0, 2),
        &without_attention.get(1).narrow(0, 0, 2),
        "row 1",
    );
    // From the <image> token on, the attention branch contributes.
    let after = (masked.get(0).get(1) - without_attention.get(0).get(1))
        .abs()
        .max()
        .double_value(&[]);
    assert!(
        after > 1e-3,
        "the attention branch is active after an image ({after})"
    );
}
