//! Parity with transformers 5.24 (`Qwen2VLImageProcessorPil`, the `Qwen2VLVideoProcessor`
//! recipe, `Qwen2_5OmniVisionEncoder`) on the fixtures written by
//! `tests/reference/gen_omni.py`. Tolerances: pixel patches ≤ 1e-5 absolute, tower output
//! relative error (max |Δ| / max |ref|) ≤ 1e-4, all in f32.

use std::path::PathBuf;

use burn::backend::NdArray;
use burn::tensor::{Tensor, TensorData};
use omniopsd_checkpoint::Checkpoint;
use omniopsd_vision::{
    preprocess_image, preprocess_video, resize_bicubic, smart_resize, Error, Frame,
    ProcessorConfig, VisionEncoder, VisionEncoderConfig,
};

type B = NdArray<f32>;

fn reference_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/reference"
    ))
}

fn fixture() -> Checkpoint {
    Checkpoint::open_file(&reference_dir().join("omni_vision.safetensors")).expect("vision fixture")
}

/// The tower of the checkpoint in `dir`, found where a thinker keeps it: `visual.*` and
/// `vision_config` at the model's level of the checkpoint.
fn tower(dir: &str) -> VisionEncoder<B> {
    let ckpt = Checkpoint::open(&reference_dir().join(dir)).expect("omni checkpoint");
    let config = ckpt
        .model_config()
        .get("vision_config")
        .expect("vision_config");
    let config = VisionEncoderConfig::from_config(&config).expect("vision_config parses");
    VisionEncoder::load(
        &ckpt.model_weights().pp("visual"),
        &config,
        &Default::default(),
    )
    .expect("vision tower loads")
}

fn model() -> VisionEncoder<B> {
    tower("omni_tiny")
}

fn read<const D: usize>(ckpt: &Checkpoint, name: &str, shape: [usize; D]) -> Vec<f32> {
    ckpt.weights()
        .tensor::<B, D>(name, shape, &Default::default())
        .unwrap_or_else(|e| panic!("fixture tensor {name}: {e}"))
        .into_data()
        .to_vec::<f32>()
        .expect("f32 data")
}

fn bytes(values: &[f32]) -> Vec<u8> {
    values.iter().map(|&v| v as u8).collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn rel_err(a: &[f32], reference: &[f32]) -> f32 {
    let scale = reference.iter().map(|x| x.abs()).fold(0.0, f32::max);
    max_abs_diff(a, reference) / scale
}

/// The tiny fixture's processor bounds (`min_pixels = 56²`, `max_pixels = 28²·64`).
fn tiny_processor() -> ProcessorConfig {
    ProcessorConfig {
        max_pixels: 28 * 28 * 64,
        ..ProcessorConfig::qwen2_5_omni_image()
    }
}

#[test]
fn image_patches_match_the_image_processor() {
    let fx = fixture();
    let rgb = bytes(&read(&fx, "image", [84, 112, 3]));
    let frame = Frame {
        width: 112,
        height: 84,
        rgb: &rgb,
    };
    let patches = preprocess_image(&frame, &tiny_processor()).expect("patches");
    assert_eq!(patches.grid_thw, [1, 6, 8]);
    let grid = read(&fx, "image_grid_thw", [1, 3]);
    assert_eq!(grid, vec![1.0, 6.0, 8.0]);
    let err = max_abs_diff(&patches.data, &read(&fx, "image_pixel_values", [48, 1176]));
    eprintln!("image patches max abs err: {err:e}");
    assert!(err <= 1e-5, "image patches max abs err {err}");
}

#[test]
fn video_patches_match_the_video_processor_with_last_frame_repeated() {
    let fx = fixture();
    let rgb = bytes(&read(&fx, "video", [3, 56, 112, 3]));
    let per = 56 * 112 * 3;
    let frames: Vec<Frame> = (0..3)
        .map(|i| Frame {
            width: 112,
            height: 56,
            rgb: &rgb[i * per..(i + 1) * per],
        })
        .collect();
    let patches = preprocess_video(&frames, &tiny_processor()).expect("patches");
    assert_eq!(patches.grid_thw, [2, 4, 8]);
    let err = max_abs_diff(&patches.data, &read(&fx, "video_pixel_values", [64, 1176]));
    eprintln!("video patches max abs err: {err:e}");
    assert!(err <= 1e-5, "video patches max abs err {err}");
}

#[test]
fn vision_tower_matches_transformers_on_an_image() {
    let fx = fixture();
    let x = Tensor::<B, 2>::from_data(
        TensorData::new(read(&fx, "image_pixel_values", [48, 1176]), [48, 1176]),
        &Default::default(),
    );
    let out = model().forward(x, &[[1, 6, 8]]).expect("forward");
    assert_eq!(out.dims(), [12, 64]);
    let err = rel_err(
        &out.into_data().to_vec::<f32>().unwrap(),
        &read(&fx, "image_tower_out", [12, 64]),
    );
    eprintln!("vision tower (image) rel err: {err:e}");
    assert!(err <= 1e-4, "vision tower rel err {err}");
}

#[test]
fn vision_tower_matches_transformers_on_a_video_from_frames() {
    let fx = fixture();
    let rgb = bytes(&read(&fx, "video", [3, 56, 112, 3]));
    let per = 56 * 112 * 3;
    let frames: Vec<Frame> = (0..3)
        .map(|i| Frame {
            width: 112,
            height: 56,
            rgb: &rgb[i * per..(i + 1) * per],
        })
        .collect();
    let patches = preprocess_video(&frames, &tiny_processor()).unwrap();
    let out = model()
        .encode(&patches, &Default::default())
        .expect("encode");
    assert_eq!(out.dims(), [16, 64]);
    let err = rel_err(
        &out.into_data().to_vec::<f32>().unwrap(),
        &read(&fx, "video_tower_out", [16, 64]),
    );
    eprintln!("vision tower (video, end to end) rel err: {err:e}");
    assert!(err <= 1e-4, "vision tower rel err {err}");
}

#[test]
fn vision_tower_on_two_inputs_equals_each_alone() {
    let fx = fixture();
    let img = read(&fx, "image_pixel_values", [48, 1176]);
    let vid = read(&fx, "video_pixel_values", [64, 1176]);
    let both: Vec<f32> = img.iter().chain(&vid).copied().collect();
    let x = Tensor::<B, 2>::from_data(TensorData::new(both, [112, 1176]), &Default::default());
    let out = model()
        .forward(x, &[[1, 6, 8], [2, 4, 8]])
        .expect("forward");
    let reference: Vec<f32> = read(&fx, "image_tower_out", [12, 64])
        .into_iter()
        .chain(read(&fx, "video_tower_out", [16, 64]))
        .collect();
    let err = rel_err(&out.into_data().to_vec::<f32>().unwrap(), &reference);
    assert!(err <= 1e-4, "batched vision tower rel err {err}");
}

#[test]
fn smart_resize_matches_reference_values() {
    // Values from transformers' smart_resize(h, w, 28, 56*56, 28*28*1280).
    let cases = [
        ((84, 112), (84, 112)),
        ((480, 640), (476, 644)),
        ((1080, 1920), (728, 1316)),
        ((10, 10), (56, 56)),
        ((42, 70), (56, 56)),
    ];
    for ((h, w), expected) in cases {
        assert_eq!(
            smart_resize(h, w, 28, 56 * 56, 28 * 28 * 1280).unwrap(),
            expected,
            "{h}x{w}"
        );
    }
    assert!(matches!(
        smart_resize(1, 300, 28, 56 * 56, 1 << 30),
        Err(Error::AspectRatio { .. })
    ));
}

/// The generator's synthetic frame: `(3x² + 7y + 85c + 5·((x·y) mod 23)) mod 256`.
fn synthetic(height: usize, width: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(height * width * 3);
    for y in 0..height {
        for x in 0..width {
            for c in 0..3 {
                out.push(((x * x * 3 + y * 7 + c * 85 + (x * y) % 23 * 5) % 256) as u8);
            }
        }
    }
    out
}

fn check_resized_patches(case: &str, (h, w): (usize, usize), max_pixels: usize, grid: [usize; 3]) {
    let fx = Checkpoint::open_file(&reference_dir().join("omni_resize.safetensors")).unwrap();
    let rgb = synthetic(h, w);
    let cfg = ProcessorConfig {
        max_pixels,
        ..ProcessorConfig::qwen2_5_omni_image()
    };
    let patches = preprocess_image(
        &Frame {
            width: w,
            height: h,
            rgb: &rgb,
        },
        &cfg,
    )
    .expect("patches");
    assert_eq!(patches.grid_thw, grid, "{case}");
    let rows = grid[1] * grid[2];
    let reference = read(&fx, &format!("{case}_pixel_values"), [rows, 1176]);
    let err = max_abs_diff(&patches.data, &reference);
    eprintln!("resized ({case}) patches max abs err: {err:e}");
    // Bit-exact u8 resampling leaves only the f32 rounding of the normalisation.
    assert!(err <= 1e-5, "{case}: max abs err {err}");
}

#[test]
fn upscaling_matches_pillow_bicubic_through_the_processor() {
    check_resized_patches("up", (50, 70), 28 * 28 * 64, [1, 4, 4]);
}

#[test]
fn downscaling_matches_pillow_bicubic_through_the_processor() {
    check_resized_patches("down", (120, 200), 28 * 28 * 16, [1, 6, 10]);
    check_resized_patches("tiny", (150, 200), 56 * 56, [1, 2, 4]);
}

#[test]
fn frame_at_target_size_is_not_resampled() {
    let rgb = synthetic(56, 84);
    let frame = Frame {
        width: 84,
        height: 56,
        rgb: &rgb,
    };
    assert_eq!(resize_bicubic(&frame, 56, 84).unwrap(), rgb);
}

#[test]
fn frames_of_different_sizes_in_one_video_are_rejected() {
    let a = vec![0u8; 56 * 56 * 3];
    let b = vec![0u8; 56 * 84 * 3];
    let frames = [
        Frame {
            width: 56,
            height: 56,
            rgb: &a,
        },
        Frame {
            width: 84,
            height: 56,
            rgb: &b,
        },
    ];
    let err = preprocess_video(&frames, &tiny_processor()).unwrap_err();
    assert!(matches!(err, Error::FrameSize { index: 1, .. }), "{err}");
}

#[test]
fn truncated_frame_buffer_and_empty_video_are_rejected() {
    let rgb = vec![0u8; 56 * 56 * 3 - 1];
    let frame = Frame {
        width: 56,
        height: 56,
        rgb: &rgb,
    };
    let err = preprocess_image(&frame, &tiny_processor()).unwrap_err();
    assert!(matches!(err, Error::FrameBytes { index: 0, .. }), "{err}");
    assert!(matches!(
        preprocess_video(&[], &tiny_processor()),
        Err(Error::NoFrames)
    ));
    let empty = Frame {
        width: 0,
        height: 0,
        rgb: &[],
    };
    assert!(matches!(
        preprocess_image(&empty, &tiny_processor()),
        Err(Error::EmptyFrame { .. })
    ));
}

#[test]
fn patches_with_wrong_grid_are_rejected() {
    let m = model();
    let x = Tensor::<B, 2>::zeros([48, 1176], &Default::default());
    let err = m.forward(x.clone(), &[[1, 6, 6]]).unwrap_err();
    assert!(err.to_string().contains("patch rows"), "{err}");
    let err = m.forward(x, &[[1, 3, 16]]).unwrap_err();
    assert!(err.to_string().contains("grid_thw"), "{err}");
    let y = Tensor::<B, 2>::zeros([48, 100], &Default::default());
    assert!(m
        .forward(y, &[[1, 6, 8]])
        .unwrap_err()
        .to_string()
        .contains("values per patch"));
}

#[test]
fn full_omni_checkpoint_with_thinker_prefix_loads_the_same_tower() {
    let full = tower("omni_full_layout");
    let fx = fixture();
    let x = Tensor::<B, 2>::from_data(
        TensorData::new(read(&fx, "image_pixel_values", [48, 1176]), [48, 1176]),
        &Default::default(),
    );
    let out = full.forward(x, &[[1, 6, 8]]).unwrap();
    let err = rel_err(
        &out.into_data().to_vec::<f32>().unwrap(),
        &read(&fx, "image_tower_out", [12, 64]),
    );
    assert!(err <= 1e-4, "rel err {err}");
}

#[test]
fn zero_patch_sizes_and_inconsistent_patch_buffers_are_rejected() {
    let rgb = vec![0u8; 56 * 56 * 3];
    let frame = Frame {
        width: 56,
        height: 56,
        rgb: &rgb,
    };
    let cfg = ProcessorConfig {
        temporal_patch_size: 0,
        ..tiny_processor()
    };
    assert!(matches!(
        preprocess_video(&[frame], &cfg),
        Err(Error::Processor(_))
    ));
    assert!(matches!(
        preprocess_image(&frame, &cfg),
        Err(Error::Processor(_))
    ));
    assert!(matches!(
        resize_bicubic(&frame, 0, 28),
        Err(Error::EmptyFrame { .. })
    ));
    let short = Frame {
        width: 56,
        height: 56,
        rgb: &rgb[..100],
    };
    assert!(matches!(
        resize_bicubic(&short, 28, 28),
        Err(Error::FrameBytes { .. })
    ));

    let mut patches = preprocess_image(&frame, &tiny_processor()).unwrap();
    patches.data.pop();
    let err = model().encode(&patches, &Default::default()).unwrap_err();
    assert!(err.to_string().contains("patch data length"), "{err}");
}

#[test]
fn sizes_whose_products_overflow_are_refused_at_load() {
    let ckpt = Checkpoint::open(&reference_dir().join("omni_tiny")).unwrap();
    let view = ckpt.model_config().get("vision_config").unwrap();
    let base = VisionEncoderConfig::from_config(&view).unwrap();
    let huge = 1usize << 32;
    for config in [
        VisionEncoderConfig {
            spatial_merge_size: huge,
            patch_size: huge,
            ..base.clone()
        },
        // merge · patch fits (and divides the window), merge² · hidden_size does not.
        VisionEncoderConfig {
            spatial_merge_size: huge,
            patch_size: 1,
            window_size: huge,
            ..base.clone()
        },
    ] {
        let err = VisionEncoder::<B>::load(
            &ckpt.model_weights().pp("visual"),
            &config,
            &Default::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("overflows"), "{err}");
    }
}

#[test]
fn processor_sizes_whose_products_overflow_are_rejected() {
    let rgb = vec![0u8; 56 * 56 * 3];
    let frame = Frame {
        width: 56,
        height: 56,
        rgb: &rgb,
    };
    // As a checkpoint's `video_preprocessor_config.json` may give them.
    let cfg = ProcessorConfig {
        patch_size: 1 << 32,
        merge_size: 1 << 32,
        ..tiny_processor()
    };
    let err = preprocess_image(&frame, &cfg).unwrap_err();
    assert!(err.to_string().contains("overflow"), "{err}");
    assert!(matches!(
        preprocess_video(&[frame], &cfg),
        Err(Error::Processor(_))
    ));
}
